"""Where the page may read and write: the workspace root (`--root`), the model caches, and the packaged demo.

A path typed into the page is resolved (symlinks and `..` followed) and refused unless it lies under one of these;
anything that does not look like a path is taken for a hub id and left to the CLI, which checks it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""`owner/name`: a hub model or data set id (no leading dot or slash, one slash)."""

DEFAULT_UPLOAD_MB = 200


def hub_cache() -> Path:
    """Hugging Face's hub cache, as huggingface_hub computes it (HF_HUB_CACHE, HF_HOME, or ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def toolkit_cache() -> Path:
    """qlora_kit's own cache (SmolLM2's GGUF, GGUF bases made into 16-bit folders): model.cache.cache_root()."""
    from qlora_kit.model.cache import cache_root

    return cache_root()


def demo_dir() -> Path:
    """The embedded demo's assets inside the installed package (tiny model, rows): read-only, always allowed."""
    import qlora_kit.demo

    return Path(qlora_kit.demo.__file__).parent


@dataclass
class Workspace:
    root: Path
    upload_limit_mb: int = DEFAULT_UPLOAD_MB
    extra: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root).expanduser().resolve()

    @property
    def allowed(self) -> list[Path]:
        return [self.root, hub_cache().resolve(), toolkit_cache().resolve(), demo_dir().resolve(),
                *(p.resolve() for p in self.extra)]

    def is_path(self, text: str) -> bool:
        """A path rather than a hub id: starts like one, ends like a file, or names something in the root (or in
        a folder of it)."""
        text = text.strip()
        return (text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or not HUB_ID.match(text)
                or text.lower().endswith((".gguf", ".jsonl", ".json", ".csv", ".parquet", ".toml"))
                or (self.root / text).exists()
                # data/rows.jsnl: a mistyped file in a folder of the workspace, not an org/name hub id
                or ((self.root / text).parent != self.root and (self.root / text).parent.is_dir()))

    def resolve(self, text: str, what: str = "path") -> Path:
        """The absolute path `text` names (relative to the root), or a UserError when it leaves the workspace."""
        text = text.strip()
        if not text:
            raise UserError(f"The {what} is empty.", hint="Type a path inside the workspace or a hub id.")
        path = (self.root / Path(text).expanduser()).resolve()
        if not any(path == base or base in path.parents for base in self.allowed):
            raise UserError(f"{text} is outside the studio's workspace.",
                            hint=f"The studio reads and writes only under {self.root} and the model caches; "
                                 "copy the file there, or start the studio with --root pointing at its folder.")
        return path

    def reference(self, text: str, what: str) -> str:
        """A model or data reference as the recipe should hold it: a confined absolute path, or a hub id as typed."""
        text = text.strip()
        return str(self.resolve(text, what)) if self.is_path(text) else text

    def save_upload(self, temp_path: str, name: str, folder: str = "data") -> Path:
        """Copy an uploaded file (Gradio's temporary copy) to <root>/<folder>/<name> (data files to data/, documents
        to documents/), refusing one over the limit."""
        size = os.path.getsize(temp_path)
        if size > self.upload_limit_mb * 1024 * 1024:
            raise UserError(f"{name} is {size / 1e6:.0f} MB; the studio takes uploads up to {self.upload_limit_mb} MB.",
                            hint="Put the file in the workspace folder and type its path instead, or start the "
                                 "studio with a larger --max-upload-mb.")
        target = self.root / folder / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(temp_path, target)
        return target

    def runs_dir(self) -> Path:
        return self.root / "runs"

    def studio_dir(self) -> Path:
        """The studio's own scratch space (uploads in flight, dry-run previews): <root>/.studio."""
        return self.root / ".studio"
