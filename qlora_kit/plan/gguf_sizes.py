"""Which GGUF type fits which card, and which one to export: the file's size for each type, computed from
config.json alone with the per-tensor mixture the export writes (gguf_mixture.py), plus llama.cpp's f16 KV cache
at a stated context. `recommended_type` is the one answer to "which type" that the merge's last lines, the export
(no --type), the studio's Export screen, the README and docs/gguf.md all give (tests/test_gguf_verify.py holds the
documents to it).

A card fits a type when file + KV cache + COMPUTE_OVERHEAD fit in its memory less CARD_RESERVED (cards are sold
in GiB; 1 GiB for the CUDA context and a display, the budget GUIDE.md uses: 7.0 GiB of an 8 GB laptop card):
the whole model on the GPU, as Ollama and LM Studio load it when it fits. The compute-buffer allowance is an
allowance, not a measurement here.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT = 8192                 # tokens of KV cache the advice counts
COMPUTE_OVERHEAD = 0.3e9       # bytes: llama.cpp's compute buffers (allowance)
CARD_RESERVED = 1024**3        # bytes of each card not available to the model: CUDA context, display
CARDS_GIB = (4, 6, 8, 12, 16, 24, 48, 80)
ADVICE_TYPES = ("q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")
ADVICE_CARD_GIB = 8            # the card the advice is for unless told: GUIDE.md's 8 GB laptop
PREFERENCE = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m")
"""Best first. f16 is not in it: q8_0 reads back within 0.002 nats of f16's next-token distribution on
SmolLM2-135M (bench/results/gguf_verify.json), greedy tokens 90 of 93 the same, at 53 % of the size, so f16
buys nothing in use (it is the type to keep for re-quantizing elsewhere, and the export writes it on request).
Below q4_k_m the order is llama.cpp's own table (llama-quantize --help, perplexity added on Llama-3-8B without an
importance matrix): q4_k_s +0.27, q3_k_l +0.56, q3_k_m +0.66; each is smaller than the one before. q3_k_s
(+1.63, more than twice q3_k_m's loss for 9 % less file) is not advised: it is exported on request."""
LAST_RESORT = PREFERENCE[-1]
"""The type advised where none fits the card at the stated context: the smallest file, so that the most of it
stays on the GPU (llama.cpp and Ollama put the layers that do not fit on the CPU); the reason says the context at
which it would fit whole."""
CONTEXT_STEP = 1024            # the shorter context offered instead is a multiple of this
K_BLOCK = 256                  # QK_K: the row length a K-quant block needs
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


def file_bytes(config: dict, type_name: str, *, imatrix: bool = False) -> int:
    """The tensors' bytes as the export writes them for `type_name`, each in the type the mixture gives it (a
    q3_k_m file is 38 % Q4_K / Q5_K / Q6_K by weight for a 7B, so bits x parameters undercounts it by 16 %).
    `imatrix`: quantized with an importance matrix (changes q4_0 / q5_0 only: gguf_mixture.tensor_type)."""
    from qlora_kit.plan.gguf_mixture import FILE_TYPES, is_70b, tensor_bytes, tensor_type

    ft, layers, tied = FILE_TYPES[type_name], config["num_hidden_layers"], config.get("tie_word_embeddings", False)
    heads = config["num_attention_heads"]
    seventy_b = is_70b(architecture(config) or "", layers, heads, config.get("num_key_value_heads") or heads)
    return sum(tensor_bytes(shape, tensor_type(name, shape, ft, layers, tied, imatrix=imatrix, seventy_b=seventy_b))
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


def advice_lines(config: dict, folder_hint: str, context: int = CONTEXT, *, command: bool = True,
                 card_gib: int = ADVICE_CARD_GIB) -> list[str]:
    """Lines for the end of a merge: each type's file, file + KV cache, the smallest card it fits, then the
    advice (recommended_type) for `card_gib` with its reason, and the export command (`command=False`: the type
    only, for the studio, whose Export button is the command). No lines for an architecture the export does not
    write."""
    if architecture(config) is None:
        return []
    kv = kv_cache_bytes(config, context)
    lines = [f"GGUF for llama.cpp / Ollama / LM Studio (file + f16 KV cache at {context} tokens "
             f"{readable(kv).strip()} + {COMPUTE_OVERHEAD / 1e9:.1f} GB compute buffers; a card keeps 1 GiB for "
             "itself):"]
    for name in ADVICE_TYPES:
        size = file_bytes(config, name)
        card = smallest_card(size + kv + COMPUTE_OVERHEAD)
        where = f"{'an' if card in (8, 80) else 'a'} {card} GB card" if card else "no single card listed"
        lines.append(f"  {name:<7} {readable(size)} file, {readable(size + kv + COMPUTE_OVERHEAD)} in use -> {where}")
    advice = recommended_type(config, card_gib, context)
    lines.append(f"  why: {advice.reason}")
    lines.append(f"  for {'an' if card_gib in (8, 80) else 'a'} {card_gib} GB card: "
                 + (f"python tools/export_gguf.py {folder_hint} --type {advice.type}" if command else advice.type))
    return lines


@dataclass(frozen=True)
class TypeAdvice:
    type: str
    card_gib: int
    fits: bool                 # False: not even the last choice fits the card; `type` is then LAST_RESORT
    reason: str
    context: int | None = None  # not fits: the longest context (a multiple of CONTEXT_STEP) at which `type` fits
                                # whole, None where it does not fit at CONTEXT_STEP tokens either


def k_fallback_width(config: dict) -> int | None:
    """The row width 256 does not divide (hidden size first, then the MLP's), or None: such rows make llama.cpp's
    K types fall back to older blocks (gguf_mixture.FALLBACK: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0)."""
    return next((width for width in (config["hidden_size"], config["intermediate_size"]) if width % K_BLOCK), None)


def longest_context(config: dict, type_name: str, card_gib: int) -> int | None:
    """The longest context, a multiple of CONTEXT_STEP, at which `type_name`'s file + KV cache + compute buffers fit
    the card; None below CONTEXT_STEP tokens."""
    room = card_gib * 1024**3 - CARD_RESERVED - COMPUTE_OVERHEAD - file_bytes(config, type_name)
    tokens = int(room // kv_cache_bytes(config, 1)) // CONTEXT_STEP * CONTEXT_STEP if room > 0 else 0
    return tokens or None


def recommended_type(config: dict, card_gib: int = ADVICE_CARD_GIB, context: int = CONTEXT) -> TypeAdvice:
    """The best type in PREFERENCE whose file + KV cache at `context` + compute buffers fit `card_gib`.

    The best, not the smallest: a model that fits at q8_0 gets q8_0 (every small model on any card listed: the
    4-5 bit types cost a 135M..1.5B model the most, docs/gguf.md), a 7B on 8 GB gets the largest K type that
    still fits (q3_k_m is where a 7B / 8B needs it: 4-6 GB cards). Where none fits, LAST_RESORT with the context at
    which it would fit whole (R1-Distill-Llama-8B on 6 GB: 7168 tokens) or the word that part of it stays on the
    CPU. A model whose rows 256 does not divide is told why its K types are a poor trade (they fall back to Q4_0 /
    Q5_0 / Q5_1 / Q8_0 for most tensors: SmolLM2's q4_k_m is 73 % of q8_0's size and 40 times its KL)."""
    budget = card_gib * 1024**3 - CARD_RESERVED
    in_use = {name: file_bytes(config, name) + kv_cache_bytes(config, context) + COMPUTE_OVERHEAD
              for name in PREFERENCE}
    pick = next((name for name in PREFERENCE if in_use[name] <= budget), None)
    width = k_fallback_width(config)
    fallback = (f"; rows of {width} are not a multiple of {K_BLOCK}, so the K types fall back to Q4_0 / Q5_0 / Q5_1 / "
                "Q8_0 for most tensors and lose more than their names suggest") if width else ""
    if pick is None:
        shorter = longest_context(config, LAST_RESORT, card_gib)
        where = (f"it fits whole at a context of {shorter} tokens (llama.cpp --ctx-size, Ollama num_ctx), or at "
                 f"{context} llama.cpp keeps some layers on the CPU (slower)" if shorter and shorter < context else
                 "llama.cpp then keeps some layers on the CPU (slower); the smallest advised file keeps the most on "
                 "the GPU")
        return TypeAdvice(LAST_RESORT, card_gib, False,
                          f"even {LAST_RESORT} needs {readable(in_use[LAST_RESORT]).strip()} at {context} tokens, more "
                          f"than the {budget / 1e9:.2f} GB a {card_gib} GB card has for it: {where}{fallback}",
                          shorter if shorter and shorter < context else None)
    if pick == "q8_0":
        reason = (f"q8_0 fits ({readable(in_use['q8_0']).strip()} in use at {context} tokens): as good as f16 in "
                  "use at half the size, and better than any 4-6 bit type")
    else:
        better = PREFERENCE[PREFERENCE.index(pick) - 1]
        reason = (f"the best type that fits: {better} would need {readable(in_use[better]).strip()} at {context} "
                  f"tokens, {pick} needs {readable(in_use[pick]).strip()} of the card's "
                  f"{budget / 1e9:.2f} GB")
    return TypeAdvice(pick, card_gib, True, reason + fallback)
