"""Will it fit in this machine's RAM, and how long will it take? The plan of a run on a CPU.

On a machine without a GPU `python -m qlora_kit.plan RECIPE` and `python -m qlora_kit.run RECIPE` print this plan
(the GPU table only with `--gpu GIB`, labelled as another machine's). It has two halves.

RAM: what the process holds at the peak of a training step, term by term, against the machine's RAM:

    Python, torch, transformers, TRL, peft, bitsandbytes   measured: a fresh interpreter's RSS with them imported
    the tokenized rows                                     token ids as Python lists and as the Arrow dataset
    weights as the run holds them on a CPU                 NF4 linear layers; embeddings, head and norms in float32
                                                           (the only dtype qlora_kit computes in on a CPU)
    LoRA weights + gradients, AdamW state                  float32; adamw_torch keeps two float32 moments
    activations, as the run will really train             checkpointed layer inputs + one recomputed layer, or,
                                                           checkpointing off (the recipe's switch, or the run's own
                                                           decision below), every layer's saved tensors
    TRL's chunked loss                                     float32 [tokens, 32768] tiles and torch's copies of them
    what the C allocator keeps of freed tensors           measured: RSS of real runs over their live tensors

The tensor terms are qlora_kit.plan.peak's CPU estimate (fitted to live-tensor counts of real CPU steps); the
two measured terms come from `tools/calibrate_cpu_plan.py` (bench/results/cpu-plan-runs.json).

Time: the tokens to train (steps x batch x grad_accum x the rows' mean length, from the rows when the run knows
them) through a FLOPs model of one step, at this CPU's float32 matmul rate measured when the plan is made (a
fraction of a second), times an efficiency fitted to real runs; plus the evaluations and the end-of-run samples
(an upper bound: every reply as long as samples.max_new_tokens). The run's live view then corrects the training
part from its own steps (its ETA).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from qlora_kit.plan.cpu_time import Rates, TimeEstimate, duration, linear_parameters, measure_rates, time_estimate
from qlora_kit.plan.peak import GIB, Architecture, estimate, saved_activations
from qlora_kit.recipe.schema import Recipe

LIBRARIES_GIB = 0.525
"""RSS of a fresh interpreter that imported torch, transformers, TRL, peft, bitsandbytes, datasets and accelerate
(`python tools/calibrate_cpu_plan.py baseline`: 0.525 GiB three times, torch 2.13 CPU, Linux x86-64)."""
ROW_BYTES_PER_TOKEN = 260
"""RSS the rows add once read, rendered and tokenized, per token kept: the text, the token-id lists and the Arrow
dataset (500 medical-o1 rows read, 364 kept: +0.055 GiB; bench/results/cpu-plan-runs.json)."""
ALLOCATOR_KEEPS_ACTIVATIONS = 0.65
"""Freed step tensors glibc's allocator keeps mapped, as a share of the step's activations and loss tiles at the
peak: RSS of real runs above the libraries, the rows, the live tensors and the weights' share below
(bench/results/cpu-plan-runs.json)."""
ALLOCATOR_KEEPS_WEIGHTS = 0.6
"""... and, as a share of the base in float32, what loading the model leaves behind (the 16-bit checkpoint and its
conversions; once more when the 16-bit base is evaluated first)."""
CPU_ACTIVATIONS_SHARE = 0.25
"""On a CPU a run turns gradient checkpointing off when every layer's activations take at most this share of the
free RAM (qlora_kit.train.fit.checkpointing_on_cpu): recomputing costs time, and a CPU's RAM is rarely short."""


# --------------------------------------------------------------------------------------------- checkpointing


@dataclass(frozen=True)
class CheckpointingChoice:
    on: bool
    reason: str
    activations_bytes: float
    """Every layer's activations without checkpointing, at batch_size x max_length tokens."""


def checkpointing_choice(arch: Architecture, recipe: Recipe, available_bytes: float) -> CheckpointingChoice:
    """What a CPU run does about gradient checkpointing: the recipe's `false` stands; its `true` (the default) is
    turned off when every layer's activations at the longest micro-batch fit in a quarter of the free RAM."""
    need = saved_activations(arch, recipe, recipe.train.batch_size * recipe.data.max_length)
    if not recipe.train.gradient_checkpointing:
        return CheckpointingChoice(False, "off in the recipe", need)
    if need > CPU_ACTIVATIONS_SHARE * available_bytes:
        return CheckpointingChoice(True, f"on: every layer's activations (about {need / GIB:.1f} GiB) would take "
                                         f"more than a quarter of the free RAM ({available_bytes / GIB:.1f} GiB)",
                                   need)
    return CheckpointingChoice(False, f"off on this CPU: every layer's activations (about {need / GIB:.1f} GiB at "
                                      f"{recipe.data.max_length} tokens) fit in RAM ({available_bytes / GIB:.1f} GiB "
                                      "free), and recomputing them would cost about a third more time per step",
                               need)


# ------------------------------------------------------------------------------------------------------- plan


@dataclass
class CpuPlan:
    model: str
    seq_len: int
    """The longest micro-batch's length: the longest row (when the rows are known) or max_length."""
    batch: int
    checkpointing: bool
    checkpointing_reason: str
    terms_gib: dict[str, float]
    tensors_gib: float
    """The live tensors at the peak (the terms from the weights to the loss)."""
    peak_gib: float
    """Everything the process holds at its peak: what decides whether the run fits."""
    total_ram_gib: float
    available_ram_gib: float
    fits: bool
    peak_moment: str
    moments_gib: dict[str, float]
    """The process's RAM at each moment that could be the peak: the 16-bit base's evaluation, the training step
    (its longest micro-batch comes first: transformers' length grouping puts it there), the end-of-run samples."""
    time: TimeEstimate | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**asdict(self), "about": CPU_PLAN_FIELDS_EXPLAINED}


CPU_PLAN_FIELDS_EXPLAINED = {
    "peak_gib": "the process's peak resident memory (libraries, rows, live tensors and what the allocator keeps): "
                "compared with available_ram_gib; summary.json's peak_ram_gib measures it",
    "tensors_gib": "the live tensors at that peak (weights, adapter, optimizer, activations, loss tiles)",
    "available_ram_gib": "RAM free for this run when the plan was made (this process's own share included)",
    "time": "seconds: train_s from the tokens to train and this CPU's matmul rate measured now, eval_s the "
            "evaluations, samples_s an upper bound (every reply max_new_tokens long); low_s..high_s the fit's spread",
}


def make_cpu_plan(arch: Architecture, recipe: Recipe, lengths: list[int] | None = None,
                  eval_lengths: list[int] | None = None, rates: Rates | None = None,
                  ram: tuple[float, float] | None = None) -> CpuPlan:
    """The CPU plan of `recipe`: RAM at the peak against (total, available) bytes (default: this machine's now), and
    the time at `rates` (default: measured now). `lengths` / `eval_lengths`: the rows' token counts when known (the
    run knows them; `python -m qlora_kit.plan` does not, and takes every row as max_length long)."""
    total_ram, available = ram or machine_ram()
    # The run decides after loading the model: the RAM free then is what is free now minus the weights.
    choice = checkpointing_choice(arch, recipe, max(available - weight_bytes(arch, recipe), 0.0))
    trained = replace(recipe, train=replace(recipe.train, gradient_checkpointing=choice.on))
    seq = min(max(lengths), recipe.data.max_length) if lengths else recipe.data.max_length
    est = estimate(arch, trained, seq, recipe.train.batch_size, device="cpu")
    eval_rows = len(eval_lengths) if eval_lengths else recipe.data.eval_rows
    process = {"Python + torch + training libraries (measured)": LIBRARIES_GIB * GIB,
               "rows read and tokenized": ROW_BYTES_PER_TOKEN * (sum(lengths or []) + sum(eval_lengths or []))}
    float32_model = 4.0 * model_parameters(arch)
    # qlora_kit.train.base_eval: a 4-bit run with held-out rows first evaluates the 16-bit base, in float32 on a
    # CPU, when it fits (its own test: 1.2 x the weights + 0.5 GiB free).
    sixteen_bit_eval = (recipe.quant.load_in_4bit and eval_rows > 0
                        and 1.2 * float32_model + 0.5 * GIB <= available)
    kept = ALLOCATOR_KEEPS_WEIGHTS * float32_model * (2 if sixteen_bit_eval else 1)

    moments: dict[str, dict[str, float]] = {}
    peak_phase = max(est.phases, key=est.phases.get)
    # The loss tiles ([tokens, 32768] float32, beyond glibc's 32 MiB mmap threshold) go back to the system when
    # freed; the many smaller activation tensors come from the heap, which keeps them.
    activations = est.terms.get(ACTIVATIONS_OFF, 0.0) + est.terms.get(ACTIVATIONS_ON, 0.0)
    moments[f"training step ({peak_phase})"] = {
        **process, **{_ram_name(k): v for k, v in est.terms.items() if k not in ("allocator slack", "CUDA context")},
        KEPT: kept + ALLOCATOR_KEEPS_ACTIVATIONS * activations}
    if sixteen_bit_eval:
        moments["16-bit base evaluation, before the NF4 model loads"] = {
            **process, "the 16-bit base in float32 (evaluated, then freed)": float32_model,
            "one evaluation row's activations and LM-head tile": eval_bytes(arch, recipe)}
    if recipe.train.method == "sft" and recipe.samples.count:
        static = static_terms(est)
        moments["end-of-run samples (weights dequantized once)"] = {
            **process, **static, "dequantized weights + KV cache of a reply": samples_bytes(arch, recipe),
            KEPT: kept + ALLOCATOR_KEEPS_ACTIVATIONS * activations}
    totals = {name: sum(terms.values()) for name, terms in moments.items()}
    peak_moment = max(totals, key=totals.get)
    terms = moments[peak_moment]
    tensors = sum(v for k, v in terms.items() if k not in process and k != KEPT)

    notes = []
    if not lengths:
        notes.append(f"The rows are not read here: every row is taken as max_length = {recipe.data.max_length} "
                     "tokens long (an upper bound for RAM and time); `python -m qlora_kit.run RECIPE --dry-run` plans "
                     "with the real rows.")
    if recipe.memory.offload_activations or recipe.memory.embeddings_on_cpu:
        notes.append("memory.offload_activations and memory.embeddings_on_cpu change nothing on a CPU (everything is "
                     "in RAM already).")
    timing = None
    if recipe.train.method == "sft":
        rates = rates or measure_rates(arch.hidden, arch.intermediate)
        timing = time_estimate(arch, recipe, rates, choice.on, lengths, eval_lengths, sixteen_bit_eval)
    elif recipe.train.method == "grpo":
        notes.append("GRPO: no time estimate (writing the completions dominates, and their length is the model's); "
                     "the live view's ETA counts from the first steps.")
    else:
        notes.append(f"{recipe.train.method.upper()}: no time estimate yet (its rate is not measured; a step runs "
                     "both sides of each pair, and DPO and KTO a reference pass too); the live view's ETA counts "
                     "from the first steps.")
    return CpuPlan(arch.name, seq, recipe.train.batch_size, choice.on, choice.reason,
                   {k: round(v / GIB, 3) for k, v in terms.items()}, round(tensors / GIB, 3),
                   round(totals[peak_moment] / GIB, 3), round(total_ram / GIB, 1), round(available / GIB, 1),
                   totals[peak_moment] <= available, peak_moment, {k: round(v / GIB, 3) for k, v in totals.items()},
                   timing, notes)


ACTIVATIONS_ON, ACTIVATIONS_OFF = "checkpointed activations", "activations of every layer (no checkpointing)"
KEPT = "freed memory the allocator keeps (measured)"
STATIC = ("4-bit linear weights", "16-bit linear weights", "32-bit linear weights", "embeddings + lm_head",
          "norms + biases", "LoRA weights (fp32)", "optimizer state")


def model_parameters(arch: Architecture) -> int:
    """Every weight of the base: linear layers, embeddings (and an untied head), norms, q/k/v biases."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norms = (2 * arch.layers + 1) * arch.hidden + (arch.layers * (q + 2 * kv) if arch.qkv_bias else 0)
    return linear_parameters(arch) + arch.vocab * arch.hidden * (1 if arch.tied else 2) + norms


def static_terms(est) -> dict[str, float]:
    """The terms every moment after loading holds: weights, adapter, optimizer state."""
    return {_ram_name(k): v for k, v in est.terms.items() if k.startswith(STATIC)}


def weight_bytes(arch: Architecture, recipe: Recipe) -> float:
    """The weights as a CPU run holds them once loaded (before the first step)."""
    return sum(static_terms(estimate(arch, recipe, 16, 1, device="cpu")).values())


def samples_bytes(arch: Architecture, recipe: Recipe) -> float:
    """While the run writes its end-of-run replies: every 4-bit weight dequantized to float32 once
    (qlora_kit.chat.cpu_inference) and the float32 KV cache of the longest reply."""
    context = recipe.data.max_length + recipe.samples.max_new_tokens
    return 4.0 * linear_parameters(arch) + 2 * arch.layers * arch.kv_heads * arch.head_dim * context * 4


def eval_bytes(arch: Architecture, recipe: Recipe) -> float:
    """One held-out row's forward without gradients (a few [length, hidden] and [length, intermediate] tensors
    alive at once) and a float32 [256, vocab] LM-head tile (qlora_kit.train.eval_loss)."""
    n = recipe.data.max_length * recipe.train.batch_size
    return 4.0 * (n * (4 * arch.hidden + 3 * arch.intermediate) + 2 * 256 * arch.vocab)


def _ram_name(term: str) -> str:
    """The planner's term names, as a CPU run holds them."""
    if term.startswith("embeddings + lm_head"):
        return "embeddings + lm_head (float32 on a CPU)"
    if term == "4-bit linear weights":
        return "4-bit linear weights (NF4)"
    if term == "optimizer state":
        return "optimizer state (AdamW: two float32 moments)"
    return term


def machine_ram() -> tuple[float, float]:
    """(total, available) bytes of RAM; available counts this process's own resident memory as usable by it."""
    import psutil

    memory = psutil.virtual_memory()
    return float(memory.total), float(memory.available + psutil.Process(os.getpid()).memory_info().rss)


def print_cpu_plan(plan: CpuPlan, console=None) -> None:
    from rich.table import Table
    from rich.text import Text

    from qlora_kit.console import make_console

    console = console or make_console()
    console.print(Text.assemble(("RAM plan (this CPU)", "bold"),
                                f": {plan.model}, {plan.seq_len} tokens x batch {plan.batch}, gradient "
                                f"checkpointing {plan.checkpointing_reason}"), soft_wrap=True)
    table = Table()
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term, gib in plan.terms_gib.items():
        table.add_row(term, f"{gib:.3f}")
    table.add_row("[bold]peak RAM of the run", f"[bold]{plan.peak_gib:.2f}")
    console.print(table)
    verdict = "[bold green]fits" if plan.fits else "[bold red]does not fit"
    others = ", ".join(f"{name} {gib:.2f} GiB" for name, gib in plan.moments_gib.items() if name != plan.peak_moment)
    console.print(f"{verdict}[/] this machine's RAM ({plan.available_ram_gib:g} GiB free of {plan.total_ram_gib:g}); "
                  f"the peak comes with the {plan.peak_moment}: {plan.tensors_gib:.2f} GiB of live tensors"
                  + (f" (other moments: {others})." if others else "."), soft_wrap=True)
    if plan.time:
        t = plan.time
        console.print(
            f"[bold]time[/]: about {duration(t.total_s)} (likely {duration(t.low_s)} to {duration(t.high_s)}): "
            f"training {duration(t.train_s)} ({t.steps} steps, {t.train_tokens:,} tokens at about "
            f"{t.train_tokens_per_s:.0f} tokens/s), {t.evaluations} evaluations {duration(t.eval_s)}, "
            f"{t.sample_replies} sample replies up to {duration(t.samples_s)}, start-up {duration(t.startup_s)}.",
            soft_wrap=True)
        console.print(f"[dim]Tokens: {t.tokens_from}. Rate: this CPU's float32 matmuls measured now "
                      f"({t.rates['matmul_gflops']:.0f} GFLOP/s on {t.rates['threads']} threads, "
                      f"{t.rates['memory_gbs']:.0f} GB/s memory reads) through a FLOPs model fitted to real CPU runs; "
                      "another program on this CPU moves it. The live view's ETA counts from the run's own steps.",
                      soft_wrap=True)
    for note in plan.notes:
        console.print(f"[dim]{note}", soft_wrap=True)
