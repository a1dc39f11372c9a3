"""The arguments of our TRL config calls, from the recipe: trl.SFTConfig (completion-only loss, dynamic padding, the
precision), trl.GRPOConfig (the [grpo] section) and the preference methods' DPOConfig / KTOConfig / ORPOConfig (the
[pref] section); the training loop's own keys are shared by all.

Kept apart from train/ (which loads torch) so that recipe validation can read the argument names in a fraction
of a second: the [sft] pass-through table may not give any of them again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_kit.errors import did_you_mean
from qlora_kit.recipe.run_files import CHECKPOINT_DIR
from qlora_kit.recipe.schema import Recipe


def optimizer_name(choice: str, precision) -> str:
    """`auto`: paged 8-bit AdamW on CUDA (optimizer state in 8 bits, paged out under memory pressure),
    plain AdamW on CPU (paging is a CUDA feature and the adapter's state is small anyway)."""
    if choice != "auto":
        return choice
    return "paged_adamw_8bit" if precision.device == "cuda" else "adamw_torch"


def sampling_strategy(recipe: Recipe) -> str:
    if not recipe.data.shuffle:
        return "sequential"  # the file's order, as asked; also what makes runs comparable across launchers
    return "group_by_length" if recipe.train.group_by_length else "random"


def sft_keys_we_set() -> set[str]:
    """The SFTConfig arguments qlora_kit passes itself (FSDP's included): the [sft] table may not give them again.
    Read from the call's own arguments, so the list cannot fall behind it."""
    from types import SimpleNamespace

    from qlora_kit.recipe.schema import DistributedSection

    every_branch = Recipe(distributed=DistributedSection(fsdp=True))
    # A stand-in for model.Precision (device and amp are all the arguments read): no torch import, so a recipe
    # with an [sft] table is still checked in a fraction of a second.
    return set(sft_arguments(every_branch, SimpleNamespace(device="cpu", amp=""), Path(".")))


def loop_arguments(recipe: Recipe, precision, output_dir: Path) -> dict:
    """What SFT and GRPO runs share: the checkpoints' folder, batch, schedule, optimizer, checkpointing of
    activations, seeds, logging, precision, saving and trackers."""
    t = recipe.train
    return dict(
        output_dir=str(output_dir / CHECKPOINT_DIR),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(t.optim, precision),
        # Also under FSDP: FSDP's own activation_checkpointing wraps each layer in `_checkpoint_wrapped_module`,
        # which PEFT (0.21) does not strip when it picks the adapter keys, so the saved adapter came out empty.
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        full_determinism=t.deterministic,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        bf16=precision.amp == "bf16",
        fp16=precision.amp == "fp16",
        use_cpu=precision.device == "cpu",
        save_strategy="steps" if t.save_steps else "no",  # an interrupt saves either way
        save_steps=t.save_steps or None,
        save_total_limit=t.save_total_limit,
        report_to=list(recipe.output.report_to) or "none",
        disable_tqdm=True,  # the status view replaces the progress bar
    )


def sft_arguments(recipe: Recipe, precision, output_dir: Path) -> dict:
    t, d = recipe.train, recipe.data
    evaluate = d.eval_rows > 0 and t.eval_steps > 0
    return dict(
        **loop_arguments(recipe, precision, output_dir),
        # Rows over max_length were already dropped (or truncated, when asked) and reported by
        # encode.py, so TRL's own truncation never cuts an answer silently.
        max_length=d.max_length,
        completion_only_loss=True,
        per_device_eval_batch_size=t.batch_size,
        # Offloading moves activations from the GPU to RAM; on a CPU-only run there is nothing to move.
        activation_offloading=recipe.memory.offload_activations and precision.device == "cuda",
        # Dynamic padding happens in TRL's collator (pad to the longest in the batch); grouping by
        # length keeps that padding small.
        train_sampling_strategy=sampling_strategy(recipe),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        **fsdp_arguments(recipe),
    )


def grpo_arguments(recipe: Recipe, precision, output_dir: Path, reward_weights: list[float]) -> dict:
    """The GRPOConfig call: the SFT run's training keys, plus the [grpo] section."""
    g = recipe.grpo
    return dict(
        **loop_arguments(recipe, precision, output_dir),
        # Both batch keys count completions: each optimizer step sees batch_size x grad_accum of them, i.e. that
        # many divided by num_generations prompts, generated in one go (steps_per_generation = grad_accum, TRL's
        # default).
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        loss_type=g.loss_type,
        reward_weights=reward_weights,
        # load_model turns the KV cache off for training; generating without it would recompute every prefix.
        generation_kwargs={"use_cache": True},
        shuffle_dataset=recipe.data.shuffle,
        eval_strategy="no",  # judged by generation at the end (qlora_kit.results.grpo_samples), not by a loss
        remove_unused_columns=False,  # the reward functions read the answer columns
    )


DEFAULT_LOSS = {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo"}
"""pref.loss_type = "auto": TRL's default loss of each method."""


def preference_arguments(recipe: Recipe, precision, output_dir: Path) -> dict:
    """The DPOConfig / KTOConfig / ORPOConfig call: the SFT run's training keys, plus the [pref] section. The rows
    come tokenized (qlora_kit.data.pairs: each side rendered as SFT renders a completion) and already fit
    data.max_length, so TRL's own truncation never cuts a side."""
    method, p = recipe.train.method, recipe.pref
    loss = DEFAULT_LOSS[method] if p.loss_type == "auto" else p.loss_type
    arguments = dict(
        **loop_arguments(recipe, precision, output_dir),
        beta=p.beta,
        max_length=recipe.data.max_length,
        per_device_eval_batch_size=recipe.train.batch_size,
        # Dropout would make the policy's and the reference's log-probabilities of the same text differ by noise;
        # TRL turns it off by default, and so do we (LoRA's own dropout included).
        disable_dropout=True,
        eval_strategy="no",  # judged at the end (qlora_kit.results.preference_judge), before and after
        remove_unused_columns=False,
    )
    if method == "orpo":
        return {**arguments, "train_sampling_strategy": "random" if recipe.data.shuffle else "sequential"}
    arguments.update(loss_type=[loss] if method == "dpo" else loss, precompute_ref_log_probs=p.precompute_ref_log_probs,
                     activation_offloading=recipe.memory.offload_activations and precision.device == "cuda")
    # Length grouping needs an `input_ids` column, which a pair does not have (it has two sides): random batches.
    shuffled = "random" if recipe.data.shuffle else "sequential"
    if method == "kto":
        # KTO estimates its KL term from each batch's completions paired with the neighbouring prompts, built in the
        # data's order: TRL needs sequential sampling for it (the rows are shuffled with train.seed beforehand).
        arguments.update(desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         train_sampling_strategy="sequential" if loss == "kto" else shuffled)
    else:
        arguments.update(train_sampling_strategy=shuffled)
    return arguments


def preference_config_class(method: str):
    """TRL's config class of a preference method (ORPO lives in trl.experimental in TRL 1.x)."""
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig
    return trl_orpo().ORPOConfig


def trl_orpo():
    """trl.experimental.orpo (ORPOConfig, ORPOTrainer: ORPO is experimental in TRL 1.x), imported without the notice
    TRL prints on every import of trl.experimental: it tells a user nothing they can act on."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental import orpo

    return orpo


def preference_table_problems(method: str, extra: dict) -> list[str]:
    """What is wrong with [pref.extra]: keys we set ourselves, keys the method's TRL config lacks."""
    from types import SimpleNamespace

    owned = set(preference_arguments(Recipe(train=_method_section(method)), SimpleNamespace(device="cpu", amp=""),
                                      Path(".")))
    problems = [f"`pref.extra.{key}` is set by qlora_kit itself{_typed_key_for(key)}" for key in extra if key in owned]
    others = [key for key in extra if key not in owned]
    if others:
        config = preference_config_class(method)  # heavy import (seconds): only for keys that must be looked up
        known = {f.name for f in dataclasses.fields(config)}
        problems += [f"unknown {config.__name__} argument `pref.extra.{key}`{did_you_mean(key, known, 'pref.extra.')}"
                     for key in others if key not in known]
    return problems


def _method_section(method: str):
    from qlora_kit.recipe.schema import TrainSection

    return TrainSection(method=method)


def fsdp_arguments(recipe: Recipe) -> dict:
    """FSDP2 for QLoRA: full sharding and one HF-compatible state dict for checkpoints. Each rank loads the whole
    4-bit model onto its GPU before it is sharded (transformers' rank-0 loading skips quantized models), so one
    GPU must hold the 4-bit weights once; training then needs 1/N of them per GPU."""
    if not recipe.distributed.fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": True,
        "activation_checkpointing": False, "state_dict_type": "FULL_STATE_DICT"}}


def sft_table_problems(sft: dict) -> list[str]:
    """What is wrong with the recipe's [sft] pass-through table: keys we set ourselves, keys SFTConfig lacks."""
    # Every argument our SFTConfig call passes: [sft] giving one again would crash the call ("got multiple values")
    # or silently fight the typed key.
    owned = sft_keys_we_set()
    problems = [f"`sft.{key}` is set by qlora_kit itself{_typed_key_for(key)}" for key in sft if key in owned]
    others = [key for key in sft if key not in owned]
    if others:
        from trl import SFTConfig  # heavy import (seconds): only for the keys that must be looked up there

        known = {f.name for f in dataclasses.fields(SFTConfig)}
        problems += [f"unknown SFTConfig argument `sft.{key}`{did_you_mean(key, known, 'sft.')}"
                     for key in others if key not in known]
    return problems


SFT_KEY_HOMES = {
    "report_to": "output.report_to", "eval_strategy": "train.eval_steps", "eval_steps": "train.eval_steps",
    "per_device_eval_batch_size": "train.batch_size", "per_device_train_batch_size": "train.batch_size",
    "disable_tqdm": "(the live status view replaces the progress bar)", "logging_steps": "train.logging_steps",
    "max_length": "data.max_length", "learning_rate": "train.learning_rate", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "gradient_accumulation_steps": "train.grad_accum", "seed": "train.seed",
    "lr_scheduler_type": "train.lr_scheduler", "warmup_steps": "train.warmup", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "optim": "train.optim", "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "gradient_checkpointing": "train.gradient_checkpointing",
    "output_dir": "output.dir", "activation_offloading": "memory.offload_activations", "fsdp": "distributed.fsdp",
    "bf16": "quant.compute_dtype", "fp16": "quant.compute_dtype", "full_determinism": "train.deterministic",
    "beta": "pref.beta", "loss_type": "pref.loss_type", "precompute_ref_log_probs": "pref.precompute_ref_log_probs",
    "desirable_weight": "pref.desirable_weight", "undesirable_weight": "pref.undesirable_weight",
    "disable_dropout": "(dropout would make the policy's and the reference's log-probabilities differ by noise)",
    "train_sampling_strategy": "data.shuffle",
}
"""Where a user sets what an [sft] key would: the typed recipe key (or why there is none)."""


def _typed_key_for(sft_key: str) -> str:
    home = SFT_KEY_HOMES.get(sft_key)
    if not home:
        return " (it follows from the other keys)"
    return f": {home[1:-1]}" if home.startswith("(") else f"; use `{home}` instead"
