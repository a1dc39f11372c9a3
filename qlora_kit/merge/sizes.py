"""How many bytes the merged folder takes, known from the base's headers before anything is written: per tensor
to cut the output shards (shards.py), in all for the free-disk refusal (checks.check_free_disk)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.merge.tokenizer_files import tokenizer_files

if TYPE_CHECKING:
    import torch

    from qlora_kit.merge.base import Checkpoint, TensorInfo


def output_bytes(info: TensorInfo, dtype: torch.dtype) -> int:
    """One tensor as written: a floating-point one in the output dtype, any other (integer buffers) as stored."""
    return math.prod(info.shape) * (dtype.itemsize if info.dtype.is_floating_point else info.dtype.itemsize)


def estimated_output_bytes(base: Checkpoint, dtype: torch.dtype, tokenizer_dir: Path | None) -> int:
    weights = sum(output_bytes(t, dtype) for t in base.tensors.values())
    tokenizer = sum(f.stat().st_size for f in tokenizer_files(tokenizer_dir)) if tokenizer_dir else 0
    return weights + tokenizer + 1_000_000  # + config, index and model card
