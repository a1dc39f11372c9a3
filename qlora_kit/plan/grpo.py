"""The GRPO terms of the VRAM plan (train.method = "grpo"): what generating the completions keeps on the GPU.

A GRPO step has two kinds of moments, never at the same time:
- generation: the policy writes train.batch_size x train.grad_accum completions in one `model.generate` call
  (TRL's generation batch; grpo.num_generations of them per prompt). Its peak is the KV cache of all of them at
  full length (prompt + grpo.max_completion_length, bounded by data.max_length), plus one layer's prefill over
  all prompts, bitsandbytes' dequantized weight, the last token's logits of every sequence in float32 (and the
  sampling's copies of them), and the cache's growth (torch.cat: one layer's K or V exists twice for a moment).
  No gradients exist then: the previous step's were freed by the optimizer, the next step's do not exist yet.
- the log-probability + loss pass over each micro-batch of train.batch_size completions: the same forward and
  backward as an SFT step at data.max_length (TRL 1.16 scores the completion tokens with the same chunked
  `fused_lm_head` kernel as SFT's loss), so the SFT terms apply unchanged.
With grpo.beta > 0 TRL also keeps a frozen copy of the adapter as the reference ("ref"), in float32.

The KV-cache term is exact for transformers' DynamicCache (K and V per layer, kv_heads x head_dim per token, in the
compute dtype); the prefill and sampling terms are counted from the ops (tests/test_grpo_plan.py checks the total
against the live tensors of a real GRPOTrainer step on CPU, qlora_kit.plan.tensor_peak).
"""

from __future__ import annotations

SAMPLING_FP32_COPIES = 6
"""The last token's logits during sampling: the float32 logits, the temperature- and top-p-processed scores, the
sort's values and int64 indices (two float32 widths), the probabilities."""
PREFILL_WIDTHS = 3
"""One layer's prefill, without gradients, per token: its input and output (2 x hidden), q, k and v, the attention
output (hidden), and the MLP's gate, up and activated product (3 x intermediate): the widths summed are at most
PREFILL_WIDTHS x hidden + q + 2 kv + 3 x intermediate."""


def generation_sequences(recipe) -> int:
    """Completions generated in one call: TRL's generation batch, batch_size x grad_accum (steps_per_generation =
    gradient_accumulation_steps)."""
    return recipe.train.batch_size * recipe.train.grad_accum


def generation_bytes(arch, recipe, compute_bytes: int, seq_len: int | None = None) -> float:
    """The generation moment's bytes on top of the weights and adapter (no gradients, no checkpointed activations)."""
    c = compute_bytes
    sequences = generation_sequences(recipe)
    total = seq_len or recipe.data.max_length  # prompt + completion: the data check keeps every prompt within it
    prompt = max(total - recipe.grpo.max_completion_length, 1)
    kv = arch.kv_heads * arch.head_dim
    q = arch.heads * arch.head_dim
    per_token_cache = 2 * arch.layers * kv * c
    # Two candidate moments: the last token (every cache full; DynamicCache grows by torch.cat, so one layer's K or V
    # exists twice for a moment) and the prefill (the prompts' cache, one layer's activations over every prompt token).
    last_token = sequences * total * per_token_cache + sequences * total * kv * c
    prefill = sequences * prompt * (per_token_cache
                                    + (PREFILL_WIDTHS * arch.hidden + q + 2 * kv + 3 * arch.intermediate) * c)
    largest_linear = max(a * b for a, b in arch.linear_shapes().values())
    sampling = SAMPLING_FP32_COPIES * sequences * arch.vocab * 4
    return max(last_token, prefill) + largest_linear * c + sampling


def reference_adapter_bytes(recipe, lora_parameters: int) -> float:
    """grpo.beta > 0: TRL's frozen "ref" copy of the adapter (float32), for the KL term."""
    return lora_parameters * 4 if recipe.grpo.beta > 0 else 0.0


def kv_cache_gib(arch, recipe, compute_bytes: int = 2) -> float:
    """The KV cache alone, for the plan's explanation: every completion at full length."""
    total = recipe.data.max_length
    return 2 * arch.layers * generation_sequences(recipe) * total * arch.kv_heads * arch.head_dim * compute_bytes \
        / 1024**3


def grpo_suggestion(arch, recipe, budget_gib: float, estimate) -> str:
    """The GRPO switches that make a run fit, cheapest in quality first, each tried alone and then together:
    gradient checkpointing (time only), the input embedding in RAM (a copy per forward), fewer completions per
    generation (a coarser group baseline), shorter completions (cuts long reasoning). `estimate`:
    qlora_kit.plan.estimate.estimate (passed in: this module is imported by it)."""
    from dataclasses import replace

    gib = 1024**3

    def fits(candidate) -> float | None:
        total = estimate(arch, candidate).total / gib
        return total if total <= budget_gib else None

    steps: list[tuple[str, object]] = []
    current, prefix = recipe, ""
    if not recipe.train.gradient_checkpointing:
        current = replace(current, train=replace(current.train, gradient_checkpointing=True))
        steps.append(("train.gradient_checkpointing=true", current))
        prefix = "train.gradient_checkpointing=true "
    checkpointed = current
    if not recipe.memory.embeddings_on_cpu and not arch.tied:
        current = replace(current, memory=replace(current.memory, embeddings_on_cpu=True))
        steps.append(("memory.embeddings_on_cpu=true", current))
    taken = []
    for overrides, candidate in steps:  # the switches that cost only time, cumulated
        taken.append(overrides)
        total = fits(candidate)
        if total is not None:
            return f"{' '.join(taken)} (then about {total:.1f} GiB)" + _or_alone(checkpointed, prefix, replace, fits)
    base = " ".join(taken)
    for overrides, candidate in _fewer_and_shorter(current, replace):  # with them, fewer or shorter completions
        total = fits(candidate)
        if total is not None:
            return f"{base} {overrides} (then about {total:.1f} GiB)".strip()
    return "does not fit even with 2 completions of 128 tokens: use a smaller model (or a GPU with more memory)"


def _or_alone(recipe, prefix: str, replace, fits) -> str:
    """", or <fewer / shorter completions> (about N GiB)": the same run with its embedding on the GPU, when it fits."""
    for overrides, candidate in _fewer_and_shorter(recipe, replace):
        total = fits(candidate)
        if total is not None:
            return f", or {prefix}{overrides} (about {total:.1f} GiB)"
    return ""


def _fewer_and_shorter(recipe, replace) -> list[tuple[str, object]]:
    """Fewer completions a step (the group halved, one prompt a step) and shorter completions (halved, the prompt
    keeping its room), the smallest changes first: one halving, then two, ...; fewer before shorter among equals."""
    t, g = recipe.train, recipe.grpo
    group_sizes = [g.num_generations]
    while group_sizes[-1] > 2:
        group_sizes.append(group_sizes[-1] // 2)
    lengths = [g.max_completion_length]
    while lengths[-1] > 128:
        lengths.append(lengths[-1] // 2)
    prompt_room = recipe.data.max_length - g.max_completion_length
    pairs = sorted(((i, j) for i in range(len(group_sizes)) for j in range(len(lengths)) if i or j),
                   key=lambda ij: (ij[0] + ij[1], ij[1]))
    out = []
    for i, j in pairs:
        overrides, candidate = [], recipe
        if i:
            generations = group_sizes[i]
            batch = min(t.batch_size, generations)
            while generations % batch:
                batch -= 1
            candidate = replace(candidate, grpo=replace(candidate.grpo, num_generations=generations),
                                train=replace(candidate.train, batch_size=batch, grad_accum=generations // batch))
            overrides.append(f"grpo.num_generations={generations} train.batch_size={batch} "
                             f"train.grad_accum={generations // batch}")
        if j:
            completion = lengths[j]
            candidate = replace(candidate, grpo=replace(candidate.grpo, max_completion_length=completion),
                                data=replace(candidate.data, max_length=prompt_room + completion))
            overrides.append(f"grpo.max_completion_length={completion} data.max_length={prompt_room + completion}")
        out.append((" ".join(overrides), candidate))
    return out
