"""Single files of a hub model, through the huggingface_hub cache (HF_HUB_OFFLINE is respected), with
failures turned into UserErrors that say what to do."""

from __future__ import annotations

from pathlib import Path

from qlora_kit.errors import UserError


def hub_file(repo: str, revision: str, filename: str, required: bool = False) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if not required:
            return None
        raise UserError(f"Could not get {filename} of {repo} (revision {revision}).",
                        hint="HF_HUB_OFFLINE is set and the file is not in the local cache: download the model first "
                             "or pass --base with a local folder." if hub_offline() else str(e).splitlines()[0]
                        ) from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        raise UserError(f"Could not reach {repo} (revision {revision}) on the hub: {str(e).splitlines()[0]}",
                        hint="Check the id, the revision and your connection, or pass --base with a local folder."
                        ) from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
