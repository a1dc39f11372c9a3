"""Refusals made before anything is written, each naming the fix: a --base of another architecture than the
run's model, an adapter that does not fit the base, an output folder that is not ours to replace, a disk too
small for the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError
from qlora_kit.merge.hub import hub_file

if TYPE_CHECKING:
    from qlora_kit.merge.adapter import Adapter
    from qlora_kit.merge.base import Checkpoint


def expected_architecture(recipe) -> dict | None:
    """model_type/architectures of the model the run trained on, when its config can be read offline-safely."""
    from qlora_kit.recipe.schema import is_local_reference

    name = recipe.model.name
    try:
        if is_local_reference(name, Path.cwd()):
            path = Path(name).expanduser() / "config.json"
        else:
            path = hub_file(name, recipe.model.revision, "config.json")
        config = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
    except (UserError, OSError, ValueError):
        return None
    return {k: config.get(k) for k in ("model_type", "architectures")} if config else None


def check_architecture(base: Checkpoint, expected: dict | None) -> None:
    if not expected:
        return
    found = {k: base.config.get(k) for k in expected}
    if any(expected[k] and found[k] and expected[k] != found[k] for k in expected):
        raise UserError(f"The base at {base.folder} is a different architecture from the run's model.",
                        [f"run trained on: {expected}", f"--base has: {found}"],
                        hint="Pass --base with the same model the run trained on.")


def check_adapter_fits(base: Checkpoint, adapter: Adapter) -> None:
    """Every adapted module must exist in the base with the shape the adapter was trained on."""
    problems = []
    for name, module in adapter.modules.items():
        info = base.tensors.get(f"{name}.weight")
        want = (module.b.shape[0], module.a.shape[1])
        if info is None:
            tied = name.endswith("lm_head") and base.config.get("tie_word_embeddings")
            problems.append(f"{name}: no `{name}.weight` in the base" + (" (lm_head is tied to the embeddings)"
                                                                          if tied else ""))
        elif info.shape != want:
            problems.append(f"{name}: the base weight is {list(info.shape)}, the adapter expects {list(want)}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError(f"The adapter does not fit the base at {base.folder} "
                        f"({len(problems)} of {len(adapter.modules)} layers):", shown,
                        hint="The adapter was trained on another model: pass --base with the run's base model.")


def local_inputs(recipe, base_override: str | None) -> list[Path]:
    """The local folders the merge reads from: --overwrite must never delete one of them."""
    from qlora_kit.recipe.schema import is_local_reference

    names = [recipe.model.name, recipe.model.tokenizer, base_override]
    return [Path(n).expanduser().resolve() for n in names if n and is_local_reference(n, Path.cwd())]


def check_output_dir(out: Path, overwrite: bool, protected: list[Path]) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.", hint="Choose another --out.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"The output folder {out} exists and is not empty.",
                        hint="Choose another --out, or pass --overwrite to replace a previous merge there.")
    resolved = out.resolve()
    if any(resolved == p or resolved in p.parents for p in protected):
        raise UserError(f"--overwrite would delete {out}, which holds the run or the base model.",
                        hint="Choose an --out folder of its own.")
    if not (out / "config.json").is_file():
        raise UserError(f"--overwrite: {out} does not look like a merged model (no config.json); not deleting it.",
                        hint="Empty it yourself or choose another --out.")


def check_free_disk(out: Path, needed: int) -> None:
    """Refuse before writing when the disk cannot hold the output; a full disk mid-merge wastes the time spent."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"Not enough free disk for the merged model: it needs about {needed / 1024**3:.2f} GiB, "
                        f"{probe} has {free / 1024**3:.2f} GiB free.",
                        hint="Free some space, choose --out on another disk, or merge to a smaller --dtype.")
