"""Which GGUF type fits which card: the file's size for each type, computed from config.json alone with the
per-tensor mixture the export writes (mixture.py), plus llama.cpp's f16 KV cache at a stated context.

A card fits a type when file + KV cache + COMPUTE_OVERHEAD fit in its memory less CARD_RESERVED (cards are sold
in GiB; 1 GiB for the CUDA context and a display, the budget GUIDE.md uses: 7.0 GiB of an 8 GB laptop card):
the whole model on the GPU, as Ollama and LM Studio load it when it fits. The compute-buffer allowance is an
allowance, not a measurement here.
"""

from __future__ import annotations

CONTEXT = 8192                 # tokens of KV cache the advice counts
COMPUTE_OVERHEAD = 0.3e9       # bytes: llama.cpp's compute buffers (allowance)
CARD_RESERVED = 1024**3        # bytes of each card not available to the model: CUDA context, display
CARDS_GIB = (4, 6, 8, 12, 16, 24, 48, 80)
ADVICE_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")
SIZED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
"""The config.json architectures gguf_shapes knows: those the GGUF export writes
(qlora_kit.gguf.model_config.ARCHITECTURES; a test keeps the two equal)."""
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
"""config.json `model_type` -> architecture, for a config that names no `architectures` (a model written from a
config alone, as the demo's is): the merge writes the architecture, the base may not."""


def architecture(config: dict) -> str | None:
    """The sized architecture this config.json describes, or None when the export does not write it."""
    named = [name for name in config.get("architectures") or [] if name in SIZED_ARCHITECTURES]
    if named:
        return named[0]
    return None if config.get("architectures") else MODEL_TYPES.get(config.get("model_type", ""))


def gguf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape for a Qwen2 / Llama config.json (weights only; biases are negligible)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"token_embd.weight": (config["vocab_size"], h), "output_norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["output.weight"] = (config["vocab_size"], h)
    for b in range(config["num_hidden_layers"]):
        shapes |= {f"blk.{b}.attn_norm.weight": (h,), f"blk.{b}.ffn_norm.weight": (h,),
                   f"blk.{b}.attn_q.weight": (q, h), f"blk.{b}.attn_k.weight": (kv, h),
                   f"blk.{b}.attn_v.weight": (kv, h), f"blk.{b}.attn_output.weight": (h, q),
                   f"blk.{b}.ffn_gate.weight": (i, h), f"blk.{b}.ffn_up.weight": (i, h),
                   f"blk.{b}.ffn_down.weight": (h, i)}
    return shapes


def file_bytes(config: dict, type_name: str) -> int:
    from qlora_kit.plan.gguf_mixture import FILE_TYPES, tensor_bytes, tensor_type

    ft, layers, tied = FILE_TYPES[type_name], config["num_hidden_layers"], config.get("tie_word_embeddings", False)
    return sum(tensor_bytes(shape, tensor_type(name, shape, ft, layers, tied))
               for name, shape in gguf_shapes(config).items())


def kv_cache_bytes(config: dict, context: int = CONTEXT) -> int:
    """llama.cpp's default f16 K and V caches: 2 x layers x context x kv heads x head dim x 2 bytes."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * context * (config.get("num_key_value_heads") or heads) * head_dim * 2


def smallest_card(needed: float) -> int | None:
    return next((card for card in CARDS_GIB if needed <= card * 1024**3 - CARD_RESERVED), None)


def readable(size: float) -> str:
    """Bytes as GB to two decimals, or as MB below a tenth of a GB (a small model's files are not 0.00 GB)."""
    return f"{size / 1e9:6.2f} GB" if size >= 1e8 else f"{size / 1e6:6.1f} MB"


def advice_lines(config: dict, folder_hint: str, context: int = CONTEXT, *, command: bool = True) -> list[str]:
    """Lines for the end of a merge: each type's file, file + KV cache, the smallest card it fits, and the
    export command for the best type that fits an 8 GB card (`command=False`: the type only, for the studio, whose
    Export button is the command). No lines for an architecture the export does not write."""
    if architecture(config) is None:
        return []
    kv = kv_cache_bytes(config, context)
    lines = [f"GGUF for llama.cpp / Ollama / LM Studio (file + f16 KV cache at {context} tokens "
             f"{readable(kv).strip()} + {COMPUTE_OVERHEAD / 1e9:.1f} GB compute buffers; a card keeps 1 GiB for "
             "itself):"]
    best_8 = None
    for name in ADVICE_TYPES:
        size = file_bytes(config, name)
        card = smallest_card(size + kv + COMPUTE_OVERHEAD)
        if card is not None and card <= 8:
            best_8 = name
        where = f"{'an' if card in (8, 80) else 'a'} {card} GB card" if card else "no single card listed"
        lines.append(f"  {name:<7} {readable(size)} file, {readable(size + kv + COMPUTE_OVERHEAD)} in use -> {where}")
    pick = best_8 or "q4_k_m"
    lines.append(f"  for an 8 GB card: python tools/export_gguf.py {folder_hint} --type {pick}" if command
                 else f"  for an 8 GB card: {pick}")
    return lines
