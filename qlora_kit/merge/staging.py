"""Publishing the output folder: written beside it and moved into place only once complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Write into a sibling folder and move it into place at the end: an interrupted merge never leaves a
    half-written folder that looks like a model, and a failed one leaves nothing at all."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # deepest first; rmdir only removes them while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    usual_permissions(stage)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


def usual_permissions(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only folders and files; a model folder is normally shared like
    any other, so apply the user's umask as mkdir/open would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
