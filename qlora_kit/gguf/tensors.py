"""The weights of a GGUF export: which safetensors tensors are written under which llama.cpp names, in which
storage type and layout, read, converted and written one at a time (memory holds the largest tensor, the
embedding, and its conversion temporaries, never the whole model).

  * names: `gguf.TensorNameMap`, the converter's own table; rotary inv_freq buffers are dropped.
  * storage: the type mixture.py chooses per tensor, as llama-quantize does; 1-D tensors in f32. Every
    quantized type through quantize.quantize_k (llama.cpp's quantizers compiled with numba, their bytes
    llama-quantize's, with the imatrix's importance where one is given), converted CHUNK_WEIGHTS weights at a
    time so that no float32 copy of a whole embedding is ever made.
  * layout: Llama's q_proj/k_proj rows permuted for llama.cpp's rope (`permute_for_llama`); Qwen2 as is.
  * tied embeddings: one matrix, as token_embd.weight, no output.weight (`embedding_sources`).
  * Llama 3.1's rope scaling: the rope_freqs tensor llama.cpp's converter computes (`llama3_rope_factors`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qlora_kit.gguf.model_config import Architecture, HyperParameters
    from qlora_kit.plan.gguf_mixture import FileType

F16_MAX = 65504.0  # largest finite float16: a weight beyond it would be stored as inf
EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"  # the safetensors keys of both decoders


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is stored."""

    gguf_name: str
    source: str | None        # safetensors key; None for a tensor computed here (Llama 3 rope factors)
    shard: Path | None
    shape: tuple[int, ...]    # numpy order (rows, columns)
    qtype: str                # gguf.GGMLQuantizationType member name: F32, F16, BF16, Q8_0, Q4_K, ... (mixture.py)
    permute_heads: int = 0    # Llama q/k: the head count to permute rows by; 0 = no permutation


def llama3_rope_factors(hp: HyperParameters) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1's rope scaling, as llama.cpp's converter computes them (llama.cpp
    divides each rope frequency by its factor: 1 for short wavelengths, `factor` for long ones, a blend between)."""
    import numpy as np

    scaling = hp.rope_scaling
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    frequencies = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    factors = []
    for frequency in frequencies:
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)




def weight_files(folder: Path) -> dict[str, Path]:
    """safetensors key -> shard file, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder} has no safetensors weights (model.safetensors or an index)",
                        hint="tools/merge.py writes safetensors shards with an index.")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any data."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(set(files.values())):
        with safe_open(shard, framework="pt") as f:
            names = list(f.keys())
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names})
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise UserError("the safetensors index lists tensors its shards do not hold", missing[:5])
    return shapes


def embedding_sources(files: dict[str, Path], tied: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """(the safetensors tensors to write, {key: GGUF name} where a key is written under another tensor's name).

    Tied (config.json `tie_word_embeddings`): the output layer *is* the embedding, so one matrix is written, as
    token_embd.weight, and no output.weight; llama.cpp then computes the output with token_embd, exactly as for
    the files its own converter writes. transformers saves a tied pair under either key (5.x may keep only
    lm_head.weight), so whichever is there is used; an lm_head.weight saved beside the embedding is dropped, as
    transformers' loader ignores it for a tied model. Untied: both matrices are needed and written."""
    import gguf

    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    files = dict(files)
    present = [key for key in (EMBEDDING, OUTPUT) if key in files]
    if tied and EMBEDDING in files:
        files.pop(OUTPUT, None)
        return files, {}
    if tied and OUTPUT in files:
        return files, {OUTPUT: token_embd}
    if not tied and len(present) == 2:
        return files, {}
    raise UserError(f"the weights lack {' and '.join(k for k in (EMBEDDING, OUTPUT) if k not in files)}",
                    [f"config.json tie_word_embeddings = {str(tied).lower()}: "
                     + ("one of the two is needed" if tied else "both the embedding and lm_head are needed")],
                    hint="The folder is incomplete, or its config.json does not belong to its weights.")


def plan_tensors(files: dict[str, Path], arch: Architecture, hp: HyperParameters, ft: FileType, *,
                 imatrix: bool = False) -> list[TensorPlan]:
    """Every tensor to write, in order. `imatrix`: quantized with an importance matrix (llama.cpp's
    `qs.has_imatrix`, which changes q4_0 / q5_0's first ffn_down layers)."""
    import gguf

    from qlora_kit.plan.gguf_mixture import tensor_type

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], hp.block_count)
    files, renamed = embedding_sources(files, hp.tied_embeddings)
    shapes = tensor_shapes(files)
    plans, unknown = [], []
    for source in sorted(files, key=natural_key):
        if source.endswith("rotary_emb.inv_freq"):  # recomputed by every runtime; llama.cpp's converter drops it
            continue
        gguf_name = renamed.get(source) or name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(source)
            continue
        heads = 0
        if arch.permute_qk and gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
            heads = hp.head_count
        elif arch.permute_qk and gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
            heads = hp.head_count_kv
        shape = shapes[source]
        qtype = tensor_type(gguf_name, shape, ft, hp.block_count, tied=hp.tied_embeddings, imatrix=imatrix)
        plans.append(TensorPlan(gguf_name, source, files[source], shape, qtype, heads))
    if unknown:
        raise UserError(f"{len(unknown)} tensor(s) have no GGUF name for this architecture", unknown[:5],
                        hint="The folder holds more than a plain decoder (an adapter, a value head?).")
    if hp.rope_scaling["rope_type"] == "llama3":
        plans.append(TensorPlan(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], None, None, (hp.head_dim // 2,),
                                "F32"))
    return plans


def natural_key(name: str) -> list:
    """layers.2 before layers.10: llama.cpp does not care, but people reading `gguf-dump` do."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def permute_for_llama(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's `LlamaModel.permute`: within each head, rows [first half | second half] become
    interleaved pairs, because llama.cpp rotates adjacent dimensions where transformers rotates halves."""
    head_rows = weights.shape[0] // heads
    return (weights.reshape(heads, 2, head_rows // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def stored_bytes(plan: TensorPlan) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, byte count) of the tensor as written: GGUFWriter needs them before any data."""
    import gguf
    import numpy as np

    from qlora_kit.plan.gguf_mixture import tensor_bytes

    if plan.qtype in ("F32", "F16"):
        dtype = np.dtype(np.float32 if plan.qtype == "F32" else np.float16)
        return plan.shape, dtype, math.prod(plan.shape) * dtype.itemsize
    shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, gguf.GGMLQuantizationType[plan.qtype])
    assert math.prod(shape) == tensor_bytes(plan.shape, plan.qtype)
    return shape, np.dtype(np.uint8), math.prod(shape)


def load_tensor(plan: TensorPlan, hp: HyperParameters) -> torch.Tensor:
    """The tensor as stored in the shard (bf16 stays bf16: half the memory of float32 for the embedding),
    permuted where llama.cpp expects it."""
    import torch

    if plan.source is None:
        return torch.from_numpy(llama3_rope_factors(hp))
    from safetensors import safe_open

    with safe_open(plan.shard, framework="pt") as f:
        data = f.get_tensor(plan.source)
    return permute_for_llama(data, plan.permute_heads) if plan.permute_heads else data


CHUNK_WEIGHTS = 1 << 24  # weights converted to float32 at a time (64 MiB): RAM stays bounded for any tensor


def encode_tensor(plan: TensorPlan, data: torch.Tensor, progress: Callable[[int], object] = lambda n: None,
                  importance: np.ndarray | None = None) -> np.ndarray:
    """The tensor's bytes in its storage type; `progress(n)` after every n weights done. `importance`: the
    imatrix's per-column mean of x² for this tensor (llama-quantize's `--imatrix`), passed to every quantizer
    (Q8_0 ignores it, as llama.cpp's does); None quantizes as llama-quantize does without one."""
    import numpy as np
    import torch

    if plan.qtype == "F32":
        out = data.float().numpy()
    elif plan.qtype == "F16":
        largest = float(data.abs().max()) if data.numel() else 0.0
        if largest > F16_MAX:  # a cast would store inf: fail loudly rather than write a broken model
            raise UserError(f"{plan.source} has values up to {largest:.3g}, beyond float16's range",
                            hint="Export with --type bf16 or a quantized type (per-block scales cover this range).")
        out = data.to(torch.float16).numpy()
    elif plan.qtype == "BF16":  # the bits themselves (torch rounds to nearest even, as gguf's own BF16 does)
        out = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    else:  # every quantized type: llama.cpp's quantizers, compiled (kquants.py, block_quants.py)
        from qlora_kit.gguf.quantize import quantize_k

        rows = data.reshape(-1, data.shape[-1])
        out = np.empty(stored_bytes(plan)[0], dtype=np.uint8).reshape(rows.shape[0], -1)
        step = max(1, CHUNK_WEIGHTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].float().numpy()
            quantize_k(chunk, plan.qtype, importance, out=out[start:start + step])
            progress(chunk.size)
        return out.reshape(stored_bytes(plan)[0])
    progress(data.numel())
    return out
