"""What one QLoRA training step holds at its peak, term by term, from the model's config.json and the recipe, before
any weight is loaded: the model both plans read (qlora_kit.plan.estimate's VRAM plan for a GPU, qlora_kit.plan.cpu's
RAM plan for a CPU).

The estimate adds up what a QLoRA training step keeps at its peak (the backward pass of one recomputed layer): 4-bit
weights, 16-bit embeddings and head, LoRA weights + gradients + optimizer state, the checkpointed layer inputs (or,
checkpointing off, every layer's saved tensors), the recomputed layer's activations and their gradients or the
chunked loss tiles (whichever is larger: they never coexist), then allocator slack and the CUDA context on a GPU.
Weight and LoRA terms are exact (the tests check them against a loaded model). The activation terms are per-token
coefficients fitted to tensor-level measurements of real training steps (`tools/calibrate_plan.py`, and with
checkpointing off `tools/calibrate_cpu_plan.py tensors`, on CPU, in bfloat16 autocast as on a GPU and in float32);
the GPU-only parts (allocator slack, CUDA context, Triton's loss kernel) wait for `tools/bench.py` on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import TILED_MLP_SLICE_TOKENS, ModelSection, Recipe

GIB = 1024**3
NF4_BLOCK = 64          # bitsandbytes 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256      # double quant: absmax quantized to 8 bits in blocks of 256
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: outside the allocator, still on the card
ALLOCATOR_SLACK = 0.08  # reserved-but-unused memory from fragmentation in PyTorch's caching allocator
LOSS_TOKEN_TILE = 4096  # TRL's chunked log-prob kernel: tokens per projection tile ...
LOSS_VOCAB_TILE = 32768  # ... and vocabulary columns per tile


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    max_positions: int

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> Architecture:
        config = config.get("text_config", config)
        try:
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            return cls(
                name=name or config.get("_name_or_path", config.get("model_type", "model")),
                hidden=hidden,
                intermediate=config["intermediate_size"],
                layers=config["num_hidden_layers"],
                heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or hidden // heads,
                vocab=config["vocab_size"],
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
                max_positions=config.get("max_position_embeddings") or 1 << 20,
            )
        except KeyError as e:
            raise UserError(f"config.json of {name or 'the model'} lacks {e}: the planner knows decoder-only "
                            "transformers (Llama, Qwen2, Mistral, ...).") from None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def read_architecture(model: ModelSection) -> Architecture:
    """Only config.json: local folder, built in for the models we target (no network), or one small file
    from the hub."""
    from qlora_kit.plan.architectures import published_config

    published = bool(published_config(model.name)) and not Path(model.name).expanduser().is_dir()
    return Architecture.from_config(read_config(model),
                                    model.display_name if model.gguf_file and not published else model.name)


def read_config(model: ModelSection) -> dict:
    """The base model's config.json: a local folder, built in for the models we target (no network), or one small
    file from the hub."""
    from qlora_kit.plan.architectures import published_config

    local = Path(model.name).expanduser()
    known = published_config(model.name)
    if known and not local.is_dir():
        return dict(known)
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise UserError(f"{local} has no config.json.", hint="Point model.name at a model folder.")
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model.name, "config.json", revision=model.revision))
        except Exception as e:  # offline, unknown id, gated: the user needs the reason, not the stack
            raise UserError(f"Could not read config.json of `{model.name}`: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}",
                            hint="Check the id and your connection, or point model.name at a local folder.") from None
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class StepProfile:
    """What one QLoRA training step keeps alive besides the weights, per token of the batch, counted in elements
    of the compute dtype. Fitted by `tools/calibrate_plan.py` to tensor-level peaks (qlora_kit.plan.tensor_peak) of
    real qlora_kit training steps on CPU over ~40 shapes, the three targets' layer dimensions among them."""

    compute_bytes: int
    kept_per_layer: float
    """x hidden, per layer: what gradient checkpointing keeps of every layer (its input) at the backward's peak."""
    layer_hidden: float
    """The recomputed layer's activations and their gradients at the backward's peak: x hidden ..."""
    layer_intermediate: float
    """... x intermediate (the MLP) ..."""
    layer_kv: float
    """... x the key/value width."""
    tiled_hidden: float
    """memory.tiled_mlp: the MLP's intermediates shrink to one slice and the peak moves towards the attention's
    backward; its per-token terms x hidden ..."""
    tiled_kv: float
    """... and x the key/value width, in place of layer_hidden and layer_kv."""
    dequant: float
    """x the largest linear weight: bitsandbytes' dequantized copy during a backward matmul."""
    dropout_hidden: float
    """LoRA dropout > 0: the dropped-out copy of each adapted layer's input, x hidden ..."""
    dropout_intermediate: float
    """... x intermediate."""
    loss_hidden: float
    """x hidden: the loss backward's copies of the final hidden states (saved input, fp32 gradient, its cast)."""
    saved_hidden: float = 0.0
    """Gradient checkpointing off: what autograd saves of every layer for the backward, per token, x hidden ..."""
    saved_intermediate: float = 0.0
    """... x intermediate ..."""
    saved_kv: float = 0.0
    """... x the key/value width ..."""
    saved_dropout_hidden: float = 0.0
    """... and, LoRA dropout > 0, x hidden for the dropped-out inputs (fitted by `tools/calibrate_cpu_plan.py
    tensors --fit`: live tensors of real steps with checkpointing off and on, bench/results/cpu-plan-tensors.json)."""


# bfloat16 / float16 autocast with float32 adapters (the GPU path; measured on CPU under bf16 autocast), and
# plain float32 (qlora_kit on a CPU). `python tools/calibrate_plan.py --from bench/results/cpu-calibration.json
# --fit` re-derives these numbers from the committed measurements (a negative fit is clamped to 0: no tensor takes
# negative memory).
PROFILES = {
    "bfloat16": StepProfile(2, kept_per_layer=1.34, layer_hidden=12.66, layer_intermediate=7.11, layer_kv=6.4,
                            tiled_hidden=12.16, tiled_kv=13.74, dequant=0.58, dropout_hidden=15.67,
                            dropout_intermediate=2.36, loss_hidden=5.17, saved_hidden=11.46, saved_intermediate=4.01,
                            saved_kv=2.35, saved_dropout_hidden=14.72),
    "float32": StepProfile(4, kept_per_layer=1.0, layer_hidden=5.9, layer_intermediate=5.45, layer_kv=3.69,
                           tiled_hidden=7.31, tiled_kv=2.9, dequant=0.84, dropout_hidden=10.46,
                           dropout_intermediate=0.0, loss_hidden=3.1, saved_hidden=5.71, saved_intermediate=3.97,
                           saved_kv=2.14, saved_dropout_hidden=11.38),
}
PROFILES["float16"] = PROFILES["bfloat16"]


def saved_activations(arch: Architecture, recipe: Recipe, tokens: int, dtype: str = "float32") -> float:
    """Bytes autograd keeps of every layer until the backward reaches it when nothing is recomputed (gradient
    checkpointing off): the fitted per-token terms, once per layer."""
    p = PROFILES[dtype]
    per_token = (p.saved_hidden * arch.hidden + p.saved_intermediate * arch.intermediate
                 + p.saved_kv * arch.kv_heads * arch.head_dim)
    if recipe.lora.dropout > 0:
        per_token += p.saved_dropout_hidden * arch.hidden
    return arch.layers * tokens * per_token * p.compute_bytes


# Without Triton (on a CPU), TRL folds each loss tile with torch ops: ~7 float32 temporaries of the tile's size.
LOSS_TILE_FP32_COPIES_WITHOUT_TRITON = 7.25


@dataclass
class Estimate:
    """Bytes per term; `reserved` is what torch.cuda.max_memory_reserved() should read at the peak.

    The terms add up to the peak. A step has three candidate peaks that never coexist: the backward of the last
    recomputed layer, the chunked loss's backward, and the optimizer step (every LoRA gradient at once). `phases`
    holds all three (each with the checkpointed activations it sees); the terms show the largest."""

    terms: dict[str, float]
    phases: dict[str, float]

    @property
    def allocated(self) -> float:
        return sum(v for k, v in self.terms.items() if k not in ("allocator slack", "CUDA context"))

    @property
    def reserved(self) -> float:
        return self.allocated + self.terms["allocator slack"]

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def lora_parameters(arch: Architecture, recipe: Recipe) -> int:
    targets = set(recipe.lora.target_modules)
    shapes = arch.linear_shapes()
    chosen = shapes if "all-linear" in targets else {k: v for k, v in shapes.items() if k in targets}
    per_layer = sum(recipe.lora.r * (i + o) for i, o in chosen.values())
    if recipe.lora.use_dora:
        per_layer += sum(o for _, o in chosen.values())  # one magnitude per output feature
    return per_layer * arch.layers


def embedding_matrices_on_gpu(arch: Architecture, recipe: Recipe) -> int:
    if arch.tied:
        return 1  # one matrix serves both; it must stay on the GPU for the head
    return 1 if recipe.memory.embeddings_on_cpu else 2


def optimizer_state_bytes(recipe: Recipe, device: str) -> int:
    """Per trainable parameter: 8-bit AdamW keeps two 1-byte moments, AdamW two float32 ones."""
    optim = recipe.train.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if device == "cuda" else "adamw_torch"  # as qlora_kit.train.fit chooses
    return 2 if "8bit" in optim else 8


def estimate(arch: Architecture, recipe: Recipe, seq_len: int | None = None, batch: int | None = None,
             device: str = "cuda", compute_dtype: str | None = None) -> Estimate:
    """Peak memory of one training step at `seq_len` x `batch` (default: the recipe's max_length x batch_size),
    on `device` (`cuda` or `cpu`) computing in `compute_dtype` (default: the recipe's quant.compute_dtype on cuda,
    `auto` meaning bfloat16 or float16, both 2 bytes; float32 on cpu, the only dtype qlora_kit trains in there)."""
    from qlora_kit.plan.preference import is_preference, orpo_logits_bytes, sequences_per_row

    seq_len = seq_len or recipe.data.max_length
    batch = batch or recipe.train.batch_size
    preference = is_preference(recipe)
    if preference:  # DPO / ORPO: both sides of each pair in one batch (qlora_kit.plan.preference)
        batch *= sequences_per_row(recipe)
    tokens = seq_len * batch
    if compute_dtype is None:
        chosen = recipe.quant.compute_dtype
        compute_dtype = ("bfloat16" if chosen == "auto" else chosen) if device == "cuda" else "float32"
    profile = PROFILES[compute_dtype]
    c = profile.compute_bytes
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    q = arch.heads * arch.head_dim
    linear = sum(a * b for a, b in arch.linear_shapes().values()) * arch.layers
    if recipe.quant.load_in_4bit:
        absmax = 1 + 4 / NESTED_BLOCK if recipe.quant.double_quant else 4  # bytes per block of 64
        weight_bytes = linear * (0.5 + absmax / NF4_BLOCK)
    else:
        weight_bytes = linear * c
    lora = lora_parameters(arch, recipe)
    largest_linear = max(a * b for a, b in arch.linear_shapes().values())

    # The recomputed layer at the peak of its backward, and its LoRA gradients: one layer's worth, or all of them
    # when gradients accumulate over micro-batches (from the second micro-batch on, every .grad is already there).
    # A tiled MLP (qlora_kit.model.tiled_mlp) holds its intermediate-size tensors for one slice at a time.
    grads_kept = lora * 4 if recipe.train.grad_accum > 1 else 0
    tiled = recipe.memory.tiled_mlp and seq_len > TILED_MLP_SLICE_TOKENS  # a sequence within one slice runs untiled
    mlp_tokens = batch * TILED_MLP_SLICE_TOKENS if tiled else tokens
    per_token = (profile.tiled_hidden * h + profile.tiled_kv * kv if tiled
                 else profile.layer_hidden * h + profile.layer_kv * kv)
    per_mlp_token = profile.layer_intermediate * i
    if recipe.lora.dropout > 0:
        per_token += profile.dropout_hidden * h
        per_mlp_token += profile.dropout_intermediate * i
    layer = ((tokens * per_token + mlp_tokens * per_mlp_token) * c + profile.dequant * largest_linear * c
             + (grads_kept or lora / arch.layers * 4))
    if recipe.model.attn_implementation == "eager":
        layer += 2 * batch * arch.heads * seq_len * seq_len * c  # scores + probabilities (not calibrated)
    layer_inputs = arch.layers * tokens * h * c
    if not recipe.train.gradient_checkpointing:  # every layer's saved tensors; the last layer's are in `layer`
        kept_at_loss = saved_activations(arch, recipe, tokens, compute_dtype)
        kept_at_layer = kept_at_loss * (arch.layers - 1) / arch.layers
    elif recipe.memory.offload_activations:
        kept_at_layer = kept_at_loss = 2 * tokens * h * c  # in CPU RAM; one layer's input in flight each way
    else:
        kept_at_layer, kept_at_loss = profile.kept_per_layer * layer_inputs, layer_inputs
    # TRL's chunked loss: one [tokens, 32768] tile of logits in the compute dtype (never the full vocabulary).
    rows = min(tokens, LOSS_TOKEN_TILE)
    loss = rows * LOSS_VOCAB_TILE * c + tokens * h * c * profile.loss_hidden
    if device != "cuda":
        loss += LOSS_TILE_FP32_COPIES_WITHOUT_TRITON * rows * min(arch.vocab, LOSS_VOCAB_TILE) * 4
    loss_phase = "loss tiles (chunked, no full logits)"
    if recipe.train.method == "orpo":  # TRL's ORPOTrainer computes the full logits of both sides
        loss_phase = "ORPO's full logits (both sides)"
        loss = orpo_logits_bytes(arch, tokens, c) + tokens * h * c * profile.loss_hidden
    phases = {"recomputed layer + grads": kept_at_layer + layer,
              loss_phase: kept_at_loss + loss + grads_kept,
              "LoRA gradients at the optimizer step": lora * 4}
    if preference and recipe.train.method != "orpo" and not recipe.pref.precompute_ref_log_probs:
        # The reference's no-grad forward while the policy's saved activations are held: one tile of the
        # log-probability kernel and one layer's forward at a time (no gradient copies).
        phases["reference pass (no grad)"] = kept_at_loss + rows * LOSS_VOCAB_TILE * c + tokens * (2 * h + 3 * i) * c
    grpo = recipe.train.method == "grpo"
    if grpo:  # writing the completions: their KV cache (qlora_kit.plan.grpo); the other phases are the loss pass
        from qlora_kit.plan.grpo import generation_bytes, generation_sequences

        phases[f"generation: KV cache of {generation_sequences(recipe)} completions"] = generation_bytes(
            arch, recipe, c, seq_len)
    peak = max(phases, key=phases.get)
    kept = {"recomputed layer + grads": kept_at_layer, loss_phase: kept_at_loss,
            "reference pass (no grad)": kept_at_loss}.get(peak, 0)

    terms = {
        "4-bit linear weights" if recipe.quant.load_in_4bit else f"{8 * c}-bit linear weights": weight_bytes,
        f"embeddings + lm_head ({8 * c}-bit)": arch.vocab * h * c * embedding_matrices_on_gpu(arch, recipe),
        "norms + biases": (2 * arch.layers + 1) * h * c + (arch.layers * (q + 2 * kv) * c if arch.qkv_bias else 0),
        "LoRA weights (fp32)": lora * 4,
        "optimizer state": lora * optimizer_state_bytes(recipe, device),
        **({"reference adapter (grpo.beta > 0)": lora * 4} if grpo and recipe.grpo.beta > 0 else {}),
        **({"reference adapter (the SFT adapter's copy)": lora * 4}
           if preference and recipe.model.adapter and recipe.train.method != "orpo" else {}),
        ("checkpointed activations" if recipe.train.gradient_checkpointing
         else "activations of every layer (no checkpointing)"): kept,
        peak: phases[peak] - kept,
    }
    allocated = sum(terms.values())
    terms["allocator slack"] = allocated * ALLOCATOR_SLACK if device == "cuda" else 0.0
    terms["CUDA context"] = CUDA_CONTEXT_GIB * GIB if device == "cuda" else 0.0
    return Estimate(terms, phases)
