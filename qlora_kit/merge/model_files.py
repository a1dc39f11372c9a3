"""Everything in the merged folder besides the weights: the shard index, config.json (unquantized, in the
merged dtype), generation_config.json, and the tokenizer files, copied byte for byte from the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.merge.hub import hub_file
from qlora_kit.merge.tokenizer_files import TOKENIZER_FILES, tokenizer_files

if TYPE_CHECKING:
    from qlora_kit.merge.base import Checkpoint
    from qlora_kit.merge.run_dir import Run


def write_model_files(base: Checkpoint, stage: Path, dtype_name: str, index: dict, tokenizer_dir: Path | None) -> None:
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (stage / "config.json").write_text(json.dumps(merged_config(base.config, dtype_name), indent=2) + "\n",
                                       encoding="utf-8")
    generation = base.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, stage / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(stage)).save_pretrained(stage)
    for file in tokenizer_files(tokenizer_dir):
        target = stage / file.relative_to(tokenizer_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)  # bytes as the base ships them: no re-save through transformers


def merged_config(config: dict, dtype_name: str) -> dict:
    """The base's config.json, unquantized and in the merged dtype; everything else untouched."""
    merged = {k: v for k, v in config.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
    merged["dtype"] = dtype_name
    if "torch_dtype" in merged:  # older transformers read this name
        merged["torch_dtype"] = dtype_name
    return merged


def tokenizer_source(run: Run, base: Checkpoint, console) -> Path | None:
    """The folder whose tokenizer files are copied: the recipe's tokenizer, else the base's own; the run's
    re-saved copy in adapter/ only when there is no other."""
    model = run.recipe.model
    if model.tokenizer:
        folder = resolve_tokenizer_folder(model.tokenizer, model.revision)
    elif base.random_init:  # the rebuilt weights live in a temporary folder; the tokenizer beside the config
        folder = resolve_tokenizer_folder(model.name, model.revision)
    else:
        folder = base.folder
    if folder is not None and tokenizer_files(folder):
        return folder
    console.print(f"[yellow]note:[/] the base ships no tokenizer files; copying the run's copy from {run.adapter_dir}.")
    return run.adapter_dir if tokenizer_files(run.adapter_dir) else None


def resolve_tokenizer_folder(location: str, revision: str) -> Path | None:
    from qlora_kit.recipe.schema import is_local_reference

    if is_local_reference(location, Path.cwd()):
        folder = Path(location).expanduser()
        return folder if folder.is_dir() else None
    found = [hub_file(location, revision, name) for name in TOKENIZER_FILES]
    found = [f for f in found if f is not None]
    return found[0].parent if found else None
