"""Will it fit? A VRAM estimate from the model's config.json and the recipe, before any weight is loaded.

`python -m qlora_kit.plan RECIPE [key=value ...] [--vram-gib 8] [--json]`

The estimate adds up what a QLoRA training step keeps on the GPU at its peak (the backward pass
of one recomputed layer): 4-bit weights, 16-bit embeddings and head, LoRA weights + gradients +
optimizer state, the checkpointed layer inputs, the recomputed layer's activations and their
gradients, the chunked loss tiles, then allocator slack and the CUDA context. Weight and LoRA
terms are exact (the tests check them against a loaded model); activation terms are a model of
PyTorch's behaviour and are checked against `tools/bench.py` measurements on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.recipe import ModelSection, Recipe

GIB = 1024**3
NF4_BLOCK = 64          # bitsandbytes 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256      # double quant: absmax quantized to 8 bits in blocks of 256
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: outside the allocator, still on the card
DESKTOP_GIB = 0.5       # what the display and other processes keep on a laptop GPU
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
    from qlora_kit.architectures import published_config

    local = Path(model.name).expanduser()
    known = published_config(model.name)
    if known and not local.is_dir():
        return Architecture.from_config(known, model.name)
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
    return Architecture.from_config(json.loads(path.read_text(encoding="utf-8")), model.name)


@dataclass
class Estimate:
    """Bytes per term; `reserved` is what torch.cuda.max_memory_reserved() should read at the peak."""

    terms: dict[str, float]

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


def estimate(arch: Architecture, recipe: Recipe, seq_len: int | None = None, batch: int | None = None,
             compute_bytes: int = 2) -> Estimate:
    """Peak memory of one training step at `seq_len` x `batch` (default: the recipe's max_length x batch_size)."""
    seq_len = seq_len or recipe.data.max_length
    batch = batch or recipe.train.batch_size
    tokens = seq_len * batch
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    q = arch.heads * arch.head_dim
    linear = sum(a * b for a, b in arch.linear_shapes().values()) * arch.layers
    if recipe.quant.load_in_4bit:
        absmax = 1 + 4 / NESTED_BLOCK if recipe.quant.double_quant else 4  # bytes per block of 64
        weight_bytes = linear * (0.5 + absmax / NF4_BLOCK)
    else:
        weight_bytes = linear * compute_bytes
    lora = lora_parameters(arch, recipe)
    optimizer_bytes = 2 if "8bit" in recipe.train.optim or recipe.train.optim == "auto" else 8
    largest_linear = max(a * b for a, b in arch.linear_shapes().values())

    # Activations of one decoder layer per token (compute dtype): attention projections and output,
    # MLP gate/up/activation/product, the two norms, and the LoRA dropout copies of each input.
    per_token_layer = 4 * h + q + 2 * kv + 4 * i
    if recipe.lora.dropout > 0:
        per_token_layer += 5 * h + q + i
    if recipe.train.gradient_checkpointing:
        kept = arch.layers * tokens * h * compute_bytes  # each layer's input, saved for the recompute
        if recipe.memory.offload_activations:
            kept = 2 * tokens * h * compute_bytes  # in CPU RAM; one layer's input in flight each way
        # The recomputed layer plus its gradients, and the residual-stream gradient (fp32 via autocast).
        working = 2 * tokens * per_token_layer * compute_bytes + 2 * tokens * h * 4
    else:
        kept = arch.layers * tokens * per_token_layer * compute_bytes
        working = 2 * tokens * h * 4
    if recipe.model.attn_implementation == "eager":
        working += 2 * batch * arch.heads * seq_len * seq_len * compute_bytes  # scores + probabilities
    # bitsandbytes dequantizes a whole weight for each matmul (forward and backward).
    dequant = 2 * largest_linear * compute_bytes
    # TRL's chunked loss: one tile of logits (compute dtype + fp32 copy) and fp32 hidden-state grads.
    n_loss = min(tokens, LOSS_TOKEN_TILE)
    loss = n_loss * min(arch.vocab, LOSS_VOCAB_TILE) * (compute_bytes + 4) + tokens * h * 4

    terms = {
        "4-bit linear weights" if recipe.quant.load_in_4bit else "16-bit linear weights": weight_bytes,
        "embeddings + lm_head (16-bit)": arch.vocab * h * compute_bytes * embedding_matrices_on_gpu(arch, recipe),
        "norms + biases": (2 * arch.layers + 1) * h * compute_bytes + (arch.layers * (q + 2 * kv) * compute_bytes
                                                                       if arch.qkv_bias else 0),
        "LoRA weights + grads (fp32)": lora * 8,
        "optimizer state": lora * optimizer_bytes,
        "checkpointed activations": kept,
        "recomputed layer + grads": working + dequant,
        "loss tiles (chunked, no full logits)": loss,
    }
    allocated = sum(terms.values())
    terms["allocator slack"] = allocated * ALLOCATOR_SLACK
    terms["CUDA context"] = CUDA_CONTEXT_GIB * GIB
    return Estimate(terms)


@dataclass
class Plan:
    model: str
    vram_gib: float
    budget_gib: float
    seq_len: int
    batch: int
    peak_gib: float
    reserved_gib: float
    fits: bool
    max_length_fit: int
    suggestion: str
    terms_gib: dict[str, float]
    context_bound: bool = False
    """max_length_fit is the model's max_position_embeddings: more would fit in memory."""


def make_plan(arch: Architecture, recipe: Recipe, vram_gib: float) -> Plan:
    budget = vram_gib - DESKTOP_GIB
    est = estimate(arch, recipe)
    seq, batch = recipe.data.max_length, recipe.train.batch_size
    fits = est.total / GIB <= budget
    longest = _longest_fitting(arch, recipe, budget)
    if fits:
        suggestion = "fits as configured"
    elif estimate(arch, recipe, seq, 1).total / GIB <= budget:
        best = max(b for b in range(1, batch + 1) if estimate(arch, recipe, seq, b).total / GIB <= budget)
        accum = math.ceil(batch * recipe.train.grad_accum / best)
        suggestion = f"train.batch_size={best} train.grad_accum={accum} (same effective batch)"
    elif longest:
        suggestion = f"data.max_length={longest} (the longest that fits at batch 1)"
    else:
        suggestion = "does not fit even at 16 tokens: use a smaller model"
    return Plan(arch.name, vram_gib, round(budget, 3), seq, batch, round(est.total / GIB, 3),
                round(est.reserved / GIB, 3), fits, longest, suggestion,
                {k: round(v / GIB, 3) for k, v in est.terms.items()},
                context_bound=bool(longest) and longest + 16 > arch.max_positions)


def _longest_fitting(arch: Architecture, recipe: Recipe, budget_gib: float) -> int:
    """Longest sequence (batch 1, multiple of 16, at most the model's context) that fits the budget; 0 if none."""
    def fits(n):
        return n <= arch.max_positions and estimate(arch, recipe, n, 1).total / GIB <= budget_gib

    if not fits(16):
        return 0
    low, high = 16, 16
    while fits(high * 2):
        high *= 2
    low, high = high, high * 2
    while high - low > 16:
        mid = (low + high) // 2 // 16 * 16
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"VRAM plan: {plan.model}, {plan.seq_len} tokens x batch {plan.batch}",
                  title_justify="left")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term, gib in plan.terms_gib.items():
        table.add_row(term, f"{gib:.3f}")
    table.add_row("[bold]peak on the card", f"[bold]{plan.peak_gib:.2f}")
    console.print(table)
    verdict = "[bold green]fits" if plan.fits else "[bold red]does not fit"
    # The search stops at the model's context length; say so, or it reads as a memory limit.
    capped = " (the model's context length, not memory, is the limit)" if plan.context_bound else ""
    console.print(f"{verdict}[/] a GPU with {plan.vram_gib:g} GiB ({plan.budget_gib:g} GiB usable after "
                  f"{DESKTOP_GIB} GiB for the desktop); longest max_length at batch 1: {plan.max_length_fit}{capped}; "
                  f"{plan.suggestion}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.plan",
                                     description="Estimate the peak VRAM of a recipe before loading any weight.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--vram-gib", type=float, default=8.0, help="GPU memory in GiB (default 8)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        from qlora_kit.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        plan = make_plan(read_architecture(recipe.model), recipe, args.vram_gib)
    except UserError as error:
        print_user_error(error)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
