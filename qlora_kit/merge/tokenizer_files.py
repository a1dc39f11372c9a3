"""Which files make up a tokenizer: the base's are downloaded with its weights (base.py), copied beside the merged
shards (model_files.py) and counted in the disk estimate (sizes.py). A list of its own, below all three."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)


def tokenizer_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for sub in TOKENIZER_DIRS:
        if (folder / sub).is_dir():
            files += sorted(p for p in (folder / sub).rglob("*") if p.is_file())
    return files
