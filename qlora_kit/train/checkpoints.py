"""Finding the checkpoint to resume from, and deciding whether resuming is safe.

The trainer writes `checkpoints/checkpoint-N/` (adapter, optimizer, scheduler, RNG states, trainer
state with the step and so the data position) and deletes older ones only after a new one is
complete. `trainer_state.json` is the last file it writes, so a checkpoint without a readable one
was cut off mid-write (a kill, a full disk) and is skipped: the previous one is used instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qlora_kit.recipe.loading import recipe_to_dict
from qlora_kit.recipe.run_files import CHECKPOINT_DIR
from qlora_kit.recipe.schema import Recipe

_NUMBERED = re.compile(r"^checkpoint-(\d+)$")

# Keys that may change between an interrupted run and its resumption: they change how the run is
# carried out (memory, logging, how long), not what it learns from or how.
RESUMABLE_CHANGES = {
    "memory.offload_activations", "memory.embeddings_on_cpu", "memory.tiled_mlp", "model.attn_implementation",
    "train.gradient_checkpointing", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.save_total_limit", "train.max_steps", "train.epochs", "output.overwrite", "output.preview_rows",
    "samples.count", "samples.max_new_tokens", "samples.greedy",  # used after training only
}


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """(path, step) of the newest complete checkpoint, or (None, 0)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None, 0
    numbered = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))),
                      reverse=True)
    for step, path in numbered:
        if is_complete(path):
            return path, step
    return None, 0


def is_complete(checkpoint: Path) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    has_adapter = (checkpoint / "adapter_model.safetensors").is_file()
    return has_adapter and isinstance(state.get("global_step"), int)


def recipe_differences(saved: Recipe, current: Recipe) -> list[str]:
    """Settings that differ between the recipe a run started with and the one given now, except those
    that are safe to change on resume."""
    old, new = _flatten(recipe_to_dict(saved)), _flatten(recipe_to_dict(current))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES]


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat
