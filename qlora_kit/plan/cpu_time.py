"""How long a run on a CPU will take: this CPU's rates measured when the plan is made, and a FLOPs model of the run.

    rates   float32 matmuls at the model's MLP shape for a quarter of a second, and reads of a 64 MB tensor
    train   tokens (steps x batch x grad_accum x the rows' mean length) x FLOPs per trained token
            / (matmul rate x train efficiency)  +  steps x the trainer's overhead per step
    eval    the evaluations' tokens x forward FLOPs / (matmul rate x eval efficiency)
    samples 2 x samples.count replies x max_new_tokens (an upper bound: replies may stop earlier) x the bytes of the
            dequantized weights each new token reads / (memory rate x generation efficiency)

The efficiencies and the overheads are fitted to real runs of `python -m qlora_kit.run` on a CPU
(`python tools/calibrate_cpu_plan.py runs --fit`, bench/results/cpu-plan-runs.json): what the FLOPs model leaves out
(bitsandbytes dequantizing every 4-bit weight per pass, elementwise work, TRL's loss, the optimizer, Python) is in
them. Another program starting on the CPU after the plan was made moves every figure; the run's live view counts
its ETA from its own steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from qlora_kit.plan.peak import Architecture, lora_parameters
from qlora_kit.recipe.schema import Recipe

RATE_TOKENS = 256
"""Rows of the timed matmul: a micro-batch's worth of tokens, so the product runs as it does in training."""


@dataclass(frozen=True)
class Rates:
    """This CPU's speed when the plan is made: what the time estimate scales."""

    matmul_gflops: float
    """float32 matrix products at the model's MLP shape, GFLOP/s."""
    memory_gbs: float
    """Reading a 64 MB float32 tensor, GB/s: what one new token of generation mostly waits for."""
    threads: int
    seconds: float
    """How long measuring took."""

    def as_dict(self) -> dict:
        return asdict(self)


def measure_rates(hidden: int = 1024, intermediate: int = 2816, budget_s: float = 0.25) -> Rates:
    """Time [256, hidden] x [hidden, intermediate] float32 products (each side at most 2,048 x 4,096, so a 7B model is
    measured as quickly) for about `budget_s`, then three sums over a 64 MB tensor."""
    import torch

    started = time.perf_counter()
    h, i = min(hidden, 2048), min(intermediate, 4096)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(RATE_TOKENS, h, generator=generator), torch.randn(h, i, generator=generator)
    torch.mm(a, b)  # warm-up: threads started, kernels chosen
    flops, spent, reps = 0.0, 0.0, 0
    while spent < budget_s * 0.8 or reps < 2:
        begin = time.perf_counter()
        torch.mm(a, b)
        spent += time.perf_counter() - begin
        flops += 2.0 * RATE_TOKENS * h * i
        reps += 1
    big = torch.ones(16 * 1024 * 1024)  # 64 MB: far beyond any cache
    big.sum()
    begin = time.perf_counter()
    for _ in range(3):
        big.sum()
    memory = 3 * big.numel() * 4 / (time.perf_counter() - begin)
    return Rates(round(flops / spent / 1e9, 2), round(memory / 1e9, 2), torch.get_num_threads(),
                 round(time.perf_counter() - started, 3))


@dataclass(frozen=True)
class Speed:
    """The time model's constants, fitted to real CPU runs by `python tools/calibrate_cpu_plan.py runs --fit`.

    The overheads are counted in matmul work (GFLOP at the measured rate) rather than seconds: another program on the
    CPU slows the Python between the products as much as the products themselves."""

    train_efficiency: float
    """Achieved share of the measured matmul rate over a training step's FLOPs."""
    train_layer_overhead_gflop: float
    """Per micro-batch and decoder layer (the LM head counted as one more): the ops' Python and dispatch, forward
    and backward, bitsandbytes dequantizing the weights, the trainer's share: what dominates a tiny model."""
    eval_efficiency: float
    """Achieved share of the matmul rate over the evaluations' forward FLOPs ..."""
    eval_layer_overhead_gflop: float
    """... and per held-out row and layer."""
    generate_layer_overhead_gflop: float
    """Per new token and layer, on top of reading the dequantized weights once at the measured memory rate: a CPU
    runs a small model's decoding op by op."""
    startup_s: float
    """Importing the libraries, reading the rows, loading and quantizing the model: the seconds that are not
    training, evaluation or samples (the mean over the fitted runs)."""
    spread: float
    """Measured over predicted seconds stayed within this factor either way over the fitted runs (training,
    evaluation and samples each), the machine's load changing during a run included."""


# Fitted by `python tools/calibrate_cpu_plan.py runs --from bench/results/cpu-plan-runs.json --fit` to four runs
# (the demo twice, SmolLM2-135M 6 steps at max_length 768 and 512) on the 2-core development machine while other
# jobs ran on it (load average 6-11): measured seconds stayed within 2.7x of these either way.
SPEED = Speed(train_efficiency=0.67, train_layer_overhead_gflop=0.586, eval_efficiency=0.955,
              eval_layer_overhead_gflop=0.131, generate_layer_overhead_gflop=0.082, startup_s=33.8, spread=2.7)


def linear_parameters(arch: Architecture) -> int:
    return sum(a * b for a, b in arch.linear_shapes().values()) * arch.layers


def forward_flops_per_token(arch: Architecture, length: float) -> float:
    """Matmul FLOPs of one token's forward in a row of `length` tokens: every linear layer, causal attention (each
    token attends to length / 2 others on average, QK and AV), the LM head."""
    attention = 2 * length * arch.heads * arch.head_dim * arch.layers
    return 2 * linear_parameters(arch) + attention + 2 * arch.vocab * arch.hidden


def train_flops_per_token(arch: Architecture, recipe: Recipe, length: float, checkpointing: bool) -> float:
    """Forward + backward of a frozen base: the backward multiplies by each weight once more (the input's gradient;
    LoRA's small matrices get weight gradients too), attention's backward twice its forward; checkpointing
    recomputes each layer's forward (not the head's)."""
    head = 2 * arch.vocab * arch.hidden
    attention = 2 * length * arch.heads * arch.head_dim * arch.layers
    linear = 2 * linear_parameters(arch)
    lora = 2 * lora_parameters(arch, recipe) * 3
    return linear * (2 + checkpointing) + attention * (3 + checkpointing) + 2 * head + lora


def generated_token_bytes(arch: Architecture) -> float:
    """Bytes one new token reads: every linear weight dequantized to float32 once for the replies
    (qlora_kit.chat.cpu_inference), and the float32 LM head."""
    return 4.0 * (linear_parameters(arch) + arch.vocab * arch.hidden)


@dataclass
class TimeEstimate:
    steps: int
    train_tokens: int
    tokens_from: str
    """Where the token count comes from: the rows' lengths, or what was assumed."""
    train_flops_per_token: float
    micro_batches: int
    train_s: float
    train_tokens_per_s: float
    evaluations: int
    """Passes over the held-out rows: the 16-bit base's and the NF4 base's before training, every eval_steps, the
    end."""
    eval_rows: int
    eval_flops: float
    eval_s: float
    sample_replies: int
    sample_tokens: int
    """An upper bound: every reply max_new_tokens long."""
    bytes_per_new_token: float
    samples_s: float
    startup_s: float
    total_s: float
    low_s: float
    high_s: float
    layers: int
    rates: dict = field(default_factory=dict)


def planned_steps(recipe: Recipe, train_rows: int) -> int:
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    return max(1, math.ceil(recipe.train.epochs * train_rows / per_step))


def evaluation_count(recipe: Recipe, steps: int, eval_rows: int, sixteen_bit_eval: bool) -> int:
    """Passes over the held-out rows: the 16-bit base's (before the NF4 model loads: qlora_kit.train.base_eval) and
    the trained model's before training, every eval_steps, and at the end (unless the last periodic one fell on the
    last step)."""
    if not eval_rows:
        return 0
    every = recipe.train.eval_steps
    periodic = steps // every if every > 0 else 0
    return 1 + sixteen_bit_eval + periodic + (0 if every > 0 and steps % every == 0 else 1)


def time_estimate(arch: Architecture, recipe: Recipe, rates: Rates, checkpointing: bool,
                  lengths: list[int] | None = None, eval_lengths: list[int] | None = None,
                  sixteen_bit_eval: bool = False, speed: Speed = SPEED) -> TimeEstimate:
    """Seconds of start-up, training, evaluation and samples at `rates`. `lengths`: the training rows' token counts
    (None: every row taken as max_length long, an upper bound); `eval_lengths` likewise for the held-out rows."""
    if lengths:
        mean = sum(lengths) / len(lengths)
        tokens_from = f"the {len(lengths):,} training rows' mean length, {mean:.0f} tokens"
    else:
        mean = float(recipe.data.max_length)
        tokens_from = f"every row taken as max_length = {recipe.data.max_length} tokens long (an upper bound)"
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    steps = planned_steps(recipe, len(lengths) if lengths else per_step)
    tokens = int(steps * per_step * mean)
    micro_batches = steps * recipe.train.grad_accum
    flops_per_token = train_flops_per_token(arch, recipe, mean, checkpointing)
    matmul = rates.matmul_gflops * 1e9
    passes = arch.layers + 1  # the decoder layers and the LM head: what runs op by op
    train_s = (tokens * flops_per_token / speed.train_efficiency
               + micro_batches * passes * speed.train_layer_overhead_gflop * 1e9) / matmul

    eval_rows = len(eval_lengths) if eval_lengths else recipe.data.eval_rows
    eval_mean = sum(eval_lengths) / len(eval_lengths) if eval_lengths else mean
    evaluations = evaluation_count(recipe, steps, eval_rows, sixteen_bit_eval)
    eval_flops = evaluations * eval_rows * eval_mean * forward_flops_per_token(arch, eval_mean)
    eval_s = (eval_flops / speed.eval_efficiency
              + evaluations * eval_rows * passes * speed.eval_layer_overhead_gflop * 1e9) / matmul

    replies = 2 * recipe.samples.count if recipe.train.method == "sft" else 0  # base and fine-tuned
    sample_tokens = replies * recipe.samples.max_new_tokens
    per_new_token = (generated_token_bytes(arch) / (rates.memory_gbs * 1e9)
                     + passes * speed.generate_layer_overhead_gflop * 1e9 / matmul)
    samples_s = sample_tokens * per_new_token
    total = speed.startup_s + train_s + eval_s + samples_s
    return TimeEstimate(steps, tokens, tokens_from, round(flops_per_token), micro_batches, round(train_s, 1),
                        round(tokens / train_s, 1), evaluations, eval_rows, round(eval_flops), round(eval_s, 1),
                        replies, sample_tokens, generated_token_bytes(arch), round(samples_s, 1), speed.startup_s,
                        round(total, 1), round(total / speed.spread, 1), round(total * speed.spread, 1), arch.layers,
                        rates.as_dict())


def duration(seconds: float) -> str:
    """"45 s", "12 min 05 s", "1 h 02 min"."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds} s"
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"
