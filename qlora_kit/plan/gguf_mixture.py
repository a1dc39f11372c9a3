"""Which storage type each tensor gets for a requested file type (`--type`), as llama.cpp's `llama-quantize`
chooses it: src/llama-quant.cpp, `llama_tensor_get_type`, `llama_tensor_get_type_impl` and
`tensor_type_fallback` (re-read in full at commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f, 2026-10-01; first
read at 007dbbf3fd17eefe9b47fee45f48f7ba5e62b714, and the only change between the two that reaches these
decoders is the fallback of a 32-block type, noted there). A q4_k_m file is a mixture, not all Q4_K: the rules
below are llama.cpp's, each with the line of C it reproduces, for the dense decoders this tool writes (Qwen2,
Llama: no experts, no Falcon, no fused qkv, no MXFP4, no --tensor-type / --output-tensor-type overrides, no
--pure). tests/test_gguf_mixture.py holds them to llama-quantize itself where a build is given.

Two facts about the model reach the rules besides the tensor's own name and shape, and are parameters here:
  * `imatrix`: llama.cpp's `qs.has_imatrix` (`llama-quantize --imatrix`). Of the types here only q4_0 and q5_0
    read it (ffn_down of the first eighth of the layers becomes Q4_1 / Q5_1); no K type's mixture depends on it,
    and no K type requires one (`tensor_requires_imatrix`: only Q2_K in a Q2_K_S file and the IQ types).
  * `seventy_b`: `qs.model.type == LLM_TYPE_70B`, which lifts a Q3_K / Q4_K attn_v to Q5_K (80-layer Llama with
    grouped-query attention, 80-layer Qwen2: `is_70b`).
The `n_gqa() >= 4` conditions of llama-quant.cpp belong to Q2_K / Q2_K_S and the IQ types only, none of which
this tool writes; q3_k_* has none.

Tensor order matters for the counted rules (`qs.i_attention_wv`, `qs.i_ffn_down` count attn_v and ffn_down
tensors as they come): llama.cpp sorts tensors by layer number (llama_model_loader's weight_name_comparer), and
`n_attention_wv` / `n_ffn_down` are the layer count for these decoders (one of each per layer), so the i-th one
is layer i here.
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
    FileType("q3_k_l", 13, "Q3_K", 3.4375),  # LLAMA_FTYPE_MOSTLY_Q3_K_L
    FileType("q3_k_m", 12, "Q3_K", 3.4375),  # LLAMA_FTYPE_MOSTLY_Q3_K_M
    FileType("q3_k_s", 11, "Q3_K", 3.4375),  # LLAMA_FTYPE_MOSTLY_Q3_K_S
)}

# ggml_blck_size: how many weights of a row one block holds (a row length must be a multiple of it)
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
              "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# bytes per block (ggml_type_size), for the size of a tensor as written. block_q3_K: hmask[32] + qs[64] +
# scales[12] + an f16 d = 110
BLOCK_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34,
               "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# tensor_type_fallback: a row length the chosen type's block does not divide (`case GGML_TYPE_Q3_K: return_type
# = GGML_TYPE_Q4_0`, with Q2_K; Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). A 32-block type has no entry: it
# becomes F16 (below)
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def file_type(spelling: str) -> FileType | None:
    """--type in our spelling or Ollama's / llama-quantize's (`q4_K_M`, `Q4_K_M`, `Q8_0`, `F16`)."""
    return FILE_TYPES.get(spelling.strip().lower())


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama_tensor_get_type_impl's `use_more_bits`: the first and last eighth of the layers and every third
    layer between them."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def is_70b(architecture: str, n_layers: int, heads: int, kv_heads: int) -> bool:
    """llama.cpp's LLM_TYPE_70B for the architectures written here, as load_arch_hparams sets it: Llama
    (src/models/llama.cpp) `case 80: type = hparams.n_head() == hparams.n_head_kv() ? LLM_TYPE_65B : LLM_TYPE_70B`
    (no experts), Qwen2 (src/models/qwen2.cpp) `case 80: type = LLM_TYPE_70B`. `architecture`: config.json's
    (LlamaForCausalLM / Qwen2ForCausalLM) or the GGUF name (llama / qwen2)."""
    if n_layers != 80:
        return False
    if architecture in ("Qwen2ForCausalLM", "qwen2"):
        return True
    return architecture in ("LlamaForCausalLM", "llama") and heads != kv_heads


def layer_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization: `ggml_n_dims(tensor) < 2` -> false; the name must end with `weight`; no
    `_norm.weight`. The other exclusions there name tensors these decoders do not have."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def tensor_type(name: str, shape: tuple[int, ...], ft: FileType, n_layers: int, tied: bool, *,
                imatrix: bool = False, seventy_b: bool = False) -> str:
    """The storage type of GGUF tensor `name` (numpy shape: rows, columns) in a file of type `ft`.

    `imatrix`: the file is quantized with an importance matrix (llama.cpp's `qs.has_imatrix`; only q4_0 / q5_0
    change). `seventy_b`: llama.cpp classes the model as 70B (`is_70b`)."""
    if not allows_quantization(name, shape):
        # convert_hf_to_gguf writes 1-D tensors (norms, biases, rope_freqs) in f32; llama-quantize copies them
        return "F32"
    new_type = ft.default
    if new_type not in QUANTIZED:
        return new_type  # `if (ggml_is_quantized(default_type))`: f16 / bf16 files have no mixture
    columns = shape[-1]  # ggml's ne[0]: the row length
    is_output = name == "output.weight"
    is_embedding = name == "token_embd.weight"
    layer = layer_of(name)  # = qs.i_attention_wv for attn_v, i_layer (qs.i_ffn_down) for ffn_down: see the top

    # `if (category == OUTPUT || (qs.has_tied_embeddings && category == TOKEN_EMBD))`: the output matrix (and a
    # tied embedding, which *is* the output) gets `nx % qk_k != 0 -> Q8_0`, else `new_type != Q8_0 -> Q6_K`
    # (every K type's output is Q6_K, q3_k_* included)
    if is_output or (tied and is_embedding):
        if columns % BLOCK_SIZE[new_type] != 0:
            new_type = "Q8_0"
        elif new_type != "Q8_0":
            new_type = "Q6_K"
    elif is_embedding:
        pass  # untied token_embd: no rule for these file types (only IQ*, TQ*, Q2_0), it stays the default type
    elif name.endswith("attn_v.weight"):
        # `Q3_K_M: new_type = qs.i_attention_wv < 2 ? Q5_K : Q4_K`
        if ft.name == "q3_k_m":
            new_type = "Q5_K" if layer < 2 else "Q4_K"
        # `else if (ftype == LLAMA_FTYPE_MOSTLY_Q3_K_L) new_type = GGML_TYPE_Q5_K`
        elif ft.name == "q3_k_l":
            new_type = "Q5_K"
        # `(Q4_K_M || Q5_K_M) && use_more_bits(qs.i_attention_wv, qs.n_attention_wv) -> Q6_K`
        elif ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            new_type = "Q6_K"
        # `Q4_K_S && qs.i_attention_wv < 4 -> Q5_K`
        elif ft.name == "q4_k_s" and layer < 4:
            new_type = "Q5_K"
        # q3_k_s: no rule, Q3_K. Then, after the chain: `if (qs.model.type == LLM_TYPE_70B) { if (new_type ==
        # Q3_K || new_type == Q4_K) new_type = Q5_K; }` (8 kv-sharing heads make attn_v 8x smaller than attn_q)
        if seventy_b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
    elif "ffn_down" in name:
        # `Q3_K_M: new_type = i_layer < n_layer/16 ? Q5_K : arch != LLM_ARCH_FALCON || use_more_bits(...) ? Q4_K
        # : Q3_K` -- not Falcon, so Q4_K past the first sixteenth
        if ft.name == "q3_k_m":
            new_type = "Q5_K" if layer < n_layers // 16 else "Q4_K"
        # `Q3_K_L: new_type = arch == LLM_ARCH_FALCON ? Q4_K : Q5_K`
        elif ft.name == "q3_k_l":
            new_type = "Q5_K"
        # `Q4_K_M: if (use_more_bits(i_layer, n_layer)) new_type = Q6_K` (the non-Falcon branch), and
        # `Q5_K_M && use_more_bits(i_layer, n_layer) -> Q6_K`
        elif ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            new_type = "Q6_K"
        # `Q4_K_S && arch != FALCON && i_layer < n_layer/8 -> Q5_K`
        elif ft.name == "q4_k_s" and layer < n_layers // 8:
            new_type = "Q5_K"
        # `(Q4_0 || Q5_0) && qs.has_imatrix && i_layer < n_layer/8 -> Q4_0 ? Q4_1 : Q5_1` ("guard against
        # craziness in the first few ffn_down layers"; only with an imatrix, so that a file without one is
        # quantized as before)
        elif ft.name in ("q4_0", "q5_0") and imatrix and layer < n_layers // 8:
            new_type = "Q4_1" if ft.name == "q4_0" else "Q5_1"
    elif name.endswith("attn_output.weight"):
        # `arch != LLM_ARCH_FALCON`, `n_expert != 8`: `Q3_K_M -> Q4_K`, `Q3_K_L -> Q5_K` (q3_k_s: no rule)
        if ft.name == "q3_k_m":
            new_type = "Q4_K"
        elif ft.name == "q3_k_l":
            new_type = "Q5_K"
    # attn_q, attn_k, ffn_gate, ffn_up: no rule for these file types

    if columns % BLOCK_SIZE[new_type] != 0:
        # tensor_type_fallback: `Q3_K -> Q4_0`, `Q4_K -> Q5_0`, `Q5_K -> Q5_1`, `Q6_K -> Q8_0`; when even that
        # block does not divide the row, `must use F16 due to unusual shape`. A 32-block target (Q4_0, Q5_0,
        # Q8_0) that does not fit goes to F16 the same way (`default: if (qk_k <= 32) return_type =
        # target_type`, then the F16 check; at 007dbbf3 llama.cpp threw there, and this tool wrote f16)
        new_type = FALLBACK.get(new_type, new_type)
        if columns % BLOCK_SIZE[new_type] != 0:
            new_type = "F16"
    return new_type


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    """ggml_row_size x rows: the bytes of the tensor as written."""
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows * shape[-1] // BLOCK_SIZE[qtype] * BLOCK_BYTES[qtype]
