"""Reaching the model and data hubs: one short check before the libraries start retrying, and ModelScope.

Without it, an unreachable Hugging Face hub costs a dry run about a minute of "Retrying in Ns" lines before the
libraries give up. Here one request of a few seconds decides: reachable, go on; unreachable but everything is in
the local cache, go on offline (HF_HUB_OFFLINE); unreachable and something is missing, one screen that says what to
download, where to put it and which recipe line to change. `HF_ENDPOINT` (a mirror) is honoured throughout, by us
and by the libraries. `model.hub` / `data.hub = "modelscope"` fetch through the `modelscope` package instead.

Runs before torch, transformers and datasets are imported: HF_HUB_OFFLINE is read when they load.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError, did_you_mean
from qlora_kit.recipe.schema import LOCAL_SUFFIXES, Recipe, is_local_reference

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 4.0
"""How long the one reachability check may take: enough for a slow line, far less than the libraries' retries."""


@dataclass(frozen=True)
class HubItem:
    kind: str
    """`model` or `dataset` (the hub's repository types)."""
    repo_id: str
    recipe_key: str
    """The recipe line that names it, for the message."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def recipe_folder(recipe: Recipe) -> Path:
    """Where the recipe's relative paths start."""
    return Path(recipe.source_path).parent if recipe.source_path else Path.cwd()


def close_local_name(reference: str, base: Path) -> str:
    """" (did you mean `data/rows.jsonl`?)" when `reference` names a file or folder that is not there but a close
    name is, in a folder that is (a mistyped local path reads as a hub id: `data/rows.jsnl`); else ""."""
    path = Path(reference).expanduser()
    folder = path.parent if path.is_absolute() else base / path.parent
    if path.parent == Path(".") or not folder.is_dir():
        return ""
    return did_you_mean(path.name, [entry.name for entry in folder.iterdir()], prefix=f"{path.parent}/")


def hub_items(recipe: Recipe) -> list[HubItem]:
    """What this run would fetch from the Hugging Face hub (hub ids; not local paths, not ModelScope ids)."""
    base = recipe_folder(recipe)
    items = []
    if recipe.model.hub == "huggingface":
        for key, value in (("model.name", recipe.model.name), ("model.tokenizer", recipe.model.tokenizer)):
            if value and not is_local_reference(value, base) and not Path(value).is_absolute():
                items.append(HubItem("model", value, key))
    source = recipe.data.source
    if recipe.data.hub == "huggingface" and source and not is_local_reference(source, base) \
            and Path(source).suffix.lower() not in LOCAL_SUFFIXES:
        items.append(HubItem("dataset", source, "data.source"))
    return items


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_cached(item: HubItem) -> bool:
    """The hub cache holds a snapshot of it (huggingface_hub's layout: <kind>s--org--name/snapshots/<commit>/)."""
    snapshots = hub_cache() / f"{item.kind}s--{item.repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(any(s.iterdir()) for s in snapshots.iterdir() if s.is_dir())


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Any HTTP answer counts (even 404): the server is there. No answer within `timeout`: not reachable."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def settle_hub_access(recipe: Recipe, say=print) -> str:
    """Decide, before the libraries load, how this run reaches the hub. Returns `online`, `offline` (unreachable,
    everything cached: HF_HUB_OFFLINE set for this process), or `local` (nothing to fetch). Raises a one-screen
    UserError when the hub is unreachable and something is not cached."""
    items = hub_items(recipe)
    if not items:
        return "local"
    base = recipe_folder(recipe)
    mistyped = [(item, close) for item in items if (close := close_local_name(item.repo_id, base))]
    if mistyped:
        raise UserError("Not a file here, and most likely not meant as a hub id:",
                        [f"{item.recipe_key} = {item.repo_id!r}: no such file or folder{close}"
                         for item, close in mistyped],
                        hint="Fix the name (a hub id is org/name, with no file extension).")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "offline"  # the user said so: the libraries read the cache, and say what is missing
    if reachable(endpoint()):
        return "online"
    missing = [item for item in items if not is_cached(item)]
    if not missing:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        say(f"[dim]{endpoint()} did not answer within {PROBE_SECONDS:g} s: using the copies in the local cache "
            f"({hub_cache()}), offline.")
        return "offline"
    raise unreachable_error(missing)


def unreachable_error(missing: list[HubItem]) -> UserError:
    where = endpoint()
    problems = [f"{item.recipe_key} = {item.repo_id!r} ({item.kind}) is not in the local cache ({hub_cache()})"
                for item in missing]
    first = missing[0]
    folder = f"models/{first.repo_id.split('/')[-1]}" if first.kind == "model" else \
        f"data/{first.repo_id.split('/')[-1]}"
    kind_flag = "" if first.kind == "model" else " --repo-type dataset"
    hint = "\n".join([
        "Any one of these:",
        "  - a mirror of the hub: set HF_ENDPOINT before the command, e.g. HF_ENDPOINT=https://hf-mirror.com",
        '  - ModelScope instead: model.hub=modelscope (and data.hub=modelscope); pip install "qlora_kit[modelscope]"',
        f"  - download where there is access: hf download {first.repo_id}{kind_flag} --local-dir {folder}",
        f"    copy {folder} here and set {first.recipe_key}={folder}"
        + (" (a data file: the .jsonl/.parquet inside it)" if first.kind == "dataset" else ""),
    ])
    return UserError(f"The Hugging Face hub ({where}) did not answer within {PROBE_SECONDS:g} s, and this run needs "
                     "files that are not on this machine:", problems, hint=hint)


MODELSCOPE_MISSING = UserError(
    "model.hub / data.hub = 'modelscope' needs the modelscope package, which is not installed.",
    hint='Install it: pip install "qlora_kit[modelscope]" (or set the hub back to huggingface).')


def fetch_from_modelscope(recipe: Recipe, weights: bool, say=print) -> None:
    """model.hub = "modelscope": download the model (only its config and tokenizer for a dry run) into ModelScope's
    cache and point model.name at that folder, so everything after reads a local folder."""
    if recipe.model.hub != "modelscope" or is_local_reference(recipe.model.name, Path.cwd()):
        return
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise MODELSCOPE_MISSING from None
    patterns = None if weights else ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
    say(f"downloading {recipe.model.name} from ModelScope" + ("" if weights else " (config and tokenizer only)"))
    try:
        folder = snapshot_download(recipe.model.name, revision=None if recipe.model.revision == "main" else
                                   recipe.model.revision, allow_patterns=patterns)
    except Exception as e:  # the client raises many types; the user needs the message
        raise UserError(f"ModelScope could not provide `{recipe.model.name}`: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}",
                        hint="Check the id on modelscope.cn (most hub ids exist there under the same name) and "
                             "your connection; or download the folder and set model.name to it.") from None
    recipe.model.name = str(folder)


def read_modelscope_rows(source: str, config: str, split: str) -> list[dict]:
    """data.hub = "modelscope": the data set's rows, through ModelScope's own loader."""
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError:
        raise MODELSCOPE_MISSING from None
    try:
        dataset = MsDataset.load(source, subset_name=config or None, split=split)
    except Exception as e:  # the client raises many types; the user needs the message
        raise UserError(f"ModelScope could not load data set `{source}` (subset `{config}`, split `{split}`): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="Check the id and subset on modelscope.cn, or download the file and point "
                             "data.source at it.") from None
    return [dict(row) for row in dataset]
