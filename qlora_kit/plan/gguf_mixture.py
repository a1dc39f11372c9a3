"""Which storage type each tensor gets for a requested file type (`--type`), as llama.cpp's `llama-quantize`
chooses it: src/llama-quant.cpp, `llama_tensor_get_type` and `llama_tensor_get_type_impl` (read at commit
007dbbf3fd17eefe9b47fee45f48f7ba5e62b714). A q4_k_m file is a mixture, not all Q4_K: the rules below are
llama.cpp's, each with the line of C it reproduces, for the dense decoders this tool writes (Qwen2, Llama: no
experts, no Falcon, no fused qkv, never 70B-shaped, no importance matrix).

Tensor order matters for two rules (`use_more_bits` counts attn_v and ffn_down tensors as they come): llama.cpp
sorts tensors by layer number (llama_model_loader's weight_name_comparer), so the i-th one is layer i here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FileType:
    name: str          # our --type spelling (lower case)
    ftype: int         # general.file_type: llama.h's LLAMA_FTYPE_MOSTLY_* (gguf.LlamaFileType)
    default: str       # llama_ftype_get_default_type: the type of every tensor no rule changes
    bits: float        # bits per weight of the default type, for size estimates before writing


FILE_TYPES = {t.name: t for t in (
    FileType("f16", 1, "F16", 16),          # LLAMA_FTYPE_MOSTLY_F16
    FileType("bf16", 32, "BF16", 16),       # LLAMA_FTYPE_MOSTLY_BF16
    FileType("q8_0", 7, "Q8_0", 8.5),       # LLAMA_FTYPE_MOSTLY_Q8_0
    FileType("q6_k", 18, "Q6_K", 6.5625),   # LLAMA_FTYPE_MOSTLY_Q6_K
    FileType("q5_k_m", 17, "Q5_K", 5.5),    # LLAMA_FTYPE_MOSTLY_Q5_K_M
    FileType("q5_k_s", 16, "Q5_K", 5.5),    # LLAMA_FTYPE_MOSTLY_Q5_K_S
    FileType("q5_0", 8, "Q5_0", 5.5),       # LLAMA_FTYPE_MOSTLY_Q5_0
    FileType("q4_k_m", 15, "Q4_K", 4.5),    # LLAMA_FTYPE_MOSTLY_Q4_K_M
    FileType("q4_k_s", 14, "Q4_K", 4.5),    # LLAMA_FTYPE_MOSTLY_Q4_K_S
    FileType("q4_0", 2, "Q4_0", 4.5),       # LLAMA_FTYPE_MOSTLY_Q4_0
)}

# ggml_blck_size: how many weights of a row one block holds (a row length must be a multiple of it)
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
              "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# bytes per block (ggml_type_size), for the size of a tensor as written
BLOCK_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34,
               "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}

# tensor_type_fallback: a row length the chosen type's block does not divide
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def file_type(spelling: str) -> FileType | None:
    """--type in our spelling or Ollama's / llama-quantize's (`q4_K_M`, `Q4_K_M`, `Q8_0`, `F16`)."""
    return FILE_TYPES.get(spelling.strip().lower())


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama_tensor_get_type_impl's `use_more_bits`: the first and last eighth of the layers and every third
    layer between them."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def layer_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization: `ggml_n_dims(tensor) < 2` -> false; the name must end with `weight`; no
    `_norm.weight`. The other exclusions there name tensors these decoders do not have."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def tensor_type(name: str, shape: tuple[int, ...], ft: FileType, n_layers: int, tied: bool) -> str:
    """The storage type of GGUF tensor `name` (numpy shape: rows, columns) in a file of type `ft`."""
    if not allows_quantization(name, shape):
        # convert_hf_to_gguf writes 1-D tensors (norms, biases, rope_freqs) in f32; llama-quantize copies them
        return "F32"
    new_type = ft.default
    if new_type not in QUANTIZED:
        return new_type  # `if (ggml_is_quantized(default_type))`: f16 / bf16 files have no mixture
    columns = shape[-1]  # ggml's ne[0]: the row length
    is_output = name == "output.weight"
    is_embedding = name == "token_embd.weight"
    layer = layer_of(name)

    # `if (category == OUTPUT || (qs.has_tied_embeddings && category == TOKEN_EMBD))`: the output matrix (and a
    # tied embedding, which *is* the output) gets `nx % qk_k != 0 -> Q8_0`, else `new_type != Q8_0 -> Q6_K`
    if is_output or (tied and is_embedding):
        if columns % BLOCK_SIZE[new_type] != 0:
            new_type = "Q8_0"
        elif new_type != "Q8_0":
            new_type = "Q6_K"
    elif is_embedding:
        pass  # untied token_embd: no rule for these file types, it stays the default type
    elif name.endswith("attn_v.weight"):
        # `(Q4_K_M || Q5_K_M) && use_more_bits(qs.i_attention_wv, qs.n_attention_wv) -> Q6_K`
        if ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            new_type = "Q6_K"
        # `Q4_K_S && qs.i_attention_wv < 4 -> Q5_K`
        elif ft.name == "q4_k_s" and layer < 4:
            new_type = "Q5_K"
    elif "ffn_down" in name:
        # `Q4_K_M: if (use_more_bits(i_layer, n_layer)) new_type = Q6_K` (the non-Falcon branch), and
        # `Q5_K_M && use_more_bits(i_layer, n_layer) -> Q6_K`
        if ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            new_type = "Q6_K"
        # `Q4_K_S && arch != FALCON && i_layer < n_layer/8 -> Q5_K`
        elif ft.name == "q4_k_s" and layer < n_layers // 8:
            new_type = "Q5_K"
    # attn_q, attn_k, attn_output, ffn_gate, ffn_up: no rule for these file types

    if columns % BLOCK_SIZE[new_type] != 0:
        # tensor_type_fallback: `Q4_K -> Q5_0`, `Q5_K -> Q5_1`, `Q6_K -> Q8_0`; when even that block does not
        # divide the row, `must use F16 due to unusual shape`. (llama.cpp throws for a Q4_0/Q5_0/Q8_0 target
        # it cannot fit; f16 is written for those instead, as this tool always has.)
        new_type = FALLBACK.get(new_type, "F16")
        if columns % BLOCK_SIZE[new_type] != 0:
            new_type = "F16"
    return new_type


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    """ggml_row_size x rows: the bytes of the tensor as written."""
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows * shape[-1] // BLOCK_SIZE[qtype] * BLOCK_BYTES[qtype]
