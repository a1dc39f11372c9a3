"""The run directory a merge starts from: its saved recipe, its adapter folder and its training summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError
from qlora_kit.recipe.run_files import ADAPTER_DIR, RECIPE_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from qlora_kit.recipe.schema import Recipe


@dataclass
class Run:
    dir: Path
    recipe: Recipe
    adapter_dir: Path
    summary: dict




def read_run(run_dir: Path) -> Run:
    from qlora_kit.recipe.loading import load_recipe

    if not run_dir.is_dir():
        raise UserError(f"Run directory not found: {run_dir}", hint="Pass the output.dir of a finished run.")
    missing = [name for name in (ADAPTER_DIR, RECIPE_FILE) if not (run_dir / name).exists()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run: {' and '.join(missing)} missing.",
                        hint="A finished `python -m qlora_kit.run` leaves adapter/ and recipe.toml in output.dir.")
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    recipe = load_recipe(run_dir / RECIPE_FILE)
    from qlora_kit.model.gguf_base import prepare_gguf_base

    prepare_gguf_base(recipe.model, weights=True)  # a GGUF base: its 16-bit folder, rebuilt if the cache lost it
    return Run(run_dir.resolve(), recipe, (run_dir / ADAPTER_DIR).resolve(), summary)
