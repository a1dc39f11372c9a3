"""The merged weights, written as safetensors shards: each base weight (or its NF4 round trip) plus
scale·B@A in float32, cast to the output dtype. The base is streamed one output shard at a time, so peak RAM
stays near one shard whatever the model size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_kit.errors import UserError
from qlora_kit.merge.plan import QUANT_BLOCKSIZE, MergePlan
from qlora_kit.merge.sizes import output_bytes

if TYPE_CHECKING:
    from qlora_kit.merge.adapter import Adapter
    from qlora_kit.merge.base import Checkpoint

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_merged_shards(base: Checkpoint, adapter: Adapter, plan: MergePlan, stage: Path, dtype: torch.dtype,
                        max_shard_bytes: int, console) -> dict:
    """Stream the base one output shard at a time: read its tensors, fold in the updates, write it, free it.
    Output shards are cut by size, not copied from the base, whose single files can be most of the model
    (R1-Distill-Qwen-1.5B ships one 3.5 GB file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    shards = plan_output_shards(base, dtype, max_shard_bytes)
    weight_map, total_size = {}, 0
    columns = (TextColumn("[bold]merging shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(shards))
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            progress.update(task, description=file)
            shard = {name: merged_tensor(name, base, adapter, plan, dtype) for name in names}
            save_file(shard, stage / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total_size += sum(t.numel() * t.element_size() for t in shard.values())
            del shard  # freed here, by reference count: nothing else holds the tensors
            progress.advance(task)
    base._pickle_cache = (None, None)
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def plan_output_shards(base: Checkpoint, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in the base's file order (sequential reads), each shard at most
    max_shard_bytes unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in base.tensors.items():
        nbytes = output_bytes(info, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def merged_tensor(name: str, base: Checkpoint, adapter: Adapter, plan: MergePlan, dtype: torch.dtype) -> torch.Tensor:
    tensor = base.read(name)
    if name in base.bnb_states:
        tensor = dequantize_stored(base, name, tensor)
    elif name in plan.round_trip:
        tensor = nf4_round_trip(tensor, plan.quant_type, plan.double_quant)
    module = adapter.modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if module is not None:
        tensor = module.merge_into(tensor.float())
    if not tensor.is_floating_point():
        return tensor.contiguous()
    if dtype == torch.float16 and tensor.dtype != torch.float16 and tensor.numel():
        # A reduction, not isfinite(): no full-size temporaries (isfinite on a large tensor costs 2.5x its size).
        low, high = torch.aminmax(tensor)
        if max(-float(low), float(high)) > torch.finfo(torch.float16).max:
            raise UserError(f"{name} has values beyond float16's range (±65504) after merging.",
                            hint="Merge with --dtype bfloat16 (same range as float32).")
    return tensor.to(dtype).contiguous()


def nf4_round_trip(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """The weight as the run's 4-bit layer saw it, in float32. bitsandbytes picks the same 4-bit codes whether
    it is given bf16 or fp32 values (checked), so quantizing the float32 copy reproduces the run exactly."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=QUANT_BLOCKSIZE,
                                       compress_statistics=double_quant, quant_type=quant_type)
    return bnbf.dequantize_4bit(packed, state).float()


def dequantize_stored(base: Checkpoint, name: str, packed: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = {aux.removeprefix(name + "."): base.read(aux, file) for aux, file in base.bnb_states[name].items()}
    return bnbf.dequantize_4bit(packed, bnbf.QuantState.from_dict(state, device=torch.device("cpu"))).float()
