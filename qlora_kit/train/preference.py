"""Preference tuning (train.method = "dpo", "kto", "orpo"): TRL's DPOTrainer, KTOTrainer or ORPOTrainer on the same
4-bit base + LoRA as SFT, with the same run directory, checkpoints, interrupts, live view and metrics.

    pairs (qlora_kit.data.pairs: each side tokenized as SFT tokenizes a completion) ─► the policy's log-probabilities
    of both sides ─► against the reference's (DPO, KTO: the base with the adapter off, or the SFT run's adapter when
    model.adapter names one; no second copy of the weights) ─► TRL's loss ─► the adapter's step.
    ORPO has no reference: an SFT loss on the chosen side plus an odds-ratio term against the rejected one.

`fit_preference` mirrors `qlora_kit.train.fit.fit` and reuses its pieces (precision, checkpointing on a CPU, the
watchers, the guard for Ctrl-C and out-of-memory); only the trainer and the summary differ.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.distributed import Processes
from qlora_kit.recipe.schema import Recipe
from qlora_kit.recipe.trainer_arguments import preference_arguments, preference_config_class, trl_orpo

TITLES = {"dpo": "DPO", "kto": "KTO", "orpo": "ORPO"}


def trainer_class(method: str):
    """TRL's trainer for the method, with our rows taken as tokenized, memory and tokens/s in the logs (as SFT's),
    and the warmup's first step training."""
    from qlora_kit.train.grpo import step_scalars
    from qlora_kit.train.warmup import WarmupFromTheFirstStep

    if method == "dpo":
        from trl import DPOTrainer as Base
    elif method == "kto":
        from trl import KTOTrainer as Base
    else:
        Base = trl_orpo().ORPOTrainer

    class QloraKitPreferenceTrainer(WarmupFromTheFirstStep, Base):
        _throughput_mark: tuple[float, int] | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Our rows come as token ids (each side rendered and encoded as SFT encodes a completion): TRL would
            # tokenize text again, with its own BOS and its own idea of where the prompt ends.
            if method == "kto" and self.calculate_KL:
                return with_kl_completions(dataset, args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature, model=None):  # ORPO's (older) per-row tokenizer
            return orpo_row(feature)

        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs.update(step_scalars(self))
            super().log(logs, start_time)

    return QloraKitPreferenceTrainer


def with_kl_completions(dataset, batch_size: int):
    """KTO's KL term compares each completion with another prompt of its batch: TRL's own pairing (completions
    rotated by one within each batch of the training order), on our tokenized rows."""
    def rotate(batch):
        batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
        return batch

    return dataset.map(rotate, batched=True, batch_size=batch_size)


def orpo_row(feature: dict) -> dict:
    """ORPOTrainer's tokenized row (prompt, prompt + chosen, prompt + rejected; labels -100 on the prompt) from ours."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + feature[f"{side}_ids"]
        row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(prompt) + feature[f"{side}_ids"]})
    return row


def fit_preference(recipe: Recipe, tokenizer, examples, out: Path, console, resume_from: Path | None = None,
                   resume_step: int = 0, processes: Processes | None = None):
    """Load the policy, train with the recipe's preference method (resuming if asked), write the artifacts.
    Survives Ctrl-C and OOM with a checkpoint, as SFT does. `examples`: qlora_kit.data.pairs.PreferenceExamples.
    Returns a fit.Outcome."""
    from transformers import PrinterCallback

    from qlora_kit.data.pairs import to_preference_dataset
    from qlora_kit.model.loading import choose_precision, count_parameters, keep_adapter_fp32
    from qlora_kit.recipe import run_files
    from qlora_kit.train import artifacts
    from qlora_kit.train.fit import Outcome, Watchers, checkpointing_on_cpu, train_and_save_adapter
    from qlora_kit.train.grpo import adapter_folder, load_policy
    from qlora_kit.train.trackers import TENSORBOARD_DIR, log_tensorboard_into

    method = recipe.train.method
    precision = choose_precision(recipe.quant)
    if recipe.train.deterministic:
        from transformers import enable_full_determinism

        enable_full_determinism(recipe.train.seed)
    if recipe.model.adapter:
        adapter_folder(recipe.model.adapter)  # a wrong path is answered before the weights load
    model = load_policy(recipe, precision)
    trainable, total = count_parameters(model)
    label = "RANDOM-INIT weights (demo/benchmark, not a real model)" if recipe.model.init == "random" else "pretrained"
    start = f"the adapter of {recipe.model.adapter}" if recipe.model.adapter else "a fresh adapter"
    reference = reference_description(recipe)
    console.print(f"model: {recipe.model.display_name} ({label}), {precision.describe()}; {TITLES[method]} from "
                  f"{start}; reference: {reference}; LoRA trains {trainable:,} of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%)")
    if precision.device == "cpu" and recipe.train.gradient_checkpointing:
        recipe = checkpointing_on_cpu(recipe, console)
    processes = processes or Processes()

    kind = "rated answers" if method == "kto" else "pairs"
    title = (f"qlora_kit · {TITLES[method]} · {recipe.model.display_name} · {label} · "
             f"{recipe.train.batch_size * recipe.train.grad_accum} {kind} a step")
    watch = Watchers.start(out, resume_step, title, console, processes)
    # TRL casts a quantized model's adapter to bfloat16 as it builds the trainer, and copies it as the reference
    # ("ref"): an SFT run's adapter would be rounded, and the reference would differ from it. Both get the exact
    # float32 weights back below.
    exact = {name: param.detach().float().clone() for name, param in model.named_parameters() if "lora_" in name}
    config = preference_config_class(method)(**preference_arguments(recipe, precision, out), **recipe.pref.extra)
    trainer = trainer_class(method)(model=model, args=config, train_dataset=to_preference_dataset(examples.train),
                                    processing_class=tokenizer, callbacks=watch.callbacks)
    keep_adapter_fp32(trainer.model)  # after TRL's bf16 cast of quantized-model adapters, before the optimizer
    for name, param in trainer.model.named_parameters():
        weights = exact.get(name.replace(".ref.", ".default."))
        if weights is not None:
            param.data = weights.clone()
    if recipe.memory.tiled_mlp:  # the MLPs over 1,024-token slices, as in SFT: the same model, patched in place
        from qlora_kit.model.tiled_mlp import tile_mlps

        tile_mlps(trainer.model)
    trainer.remove_callback(PrinterCallback)
    log_tensorboard_into(trainer, out / TENSORBOARD_DIR)
    stopped = train_and_save_adapter(trainer, watch, recipe, out, tokenizer, resume_from, processes)
    if stopped:
        return stopped
    metrics = watch.metrics
    curve_title = f"{recipe.model.display_name} · {label} · {TITLES[method]}"
    artifacts.write_loss_curve(metrics.records, out / run_files.CURVE_FILE, curve_title)
    artifacts.write_preference_curve(metrics.records, out / run_files.REWARD_CURVE_FILE, curve_title)
    summary = artifacts.summarize(metrics.records, trainer.state.global_step, len(examples.train), trainable, label,
                                  resume_step)
    # The SFT eval-loss keys say nothing of a preference run (its held-out rows are judged at the end instead).
    summary = {key: value for key, value in summary.items() if not (key.startswith(("eval", "final_eval")) and
                                                                   value is None)}
    summary.update(method=method, reference=reference, **training_rewards(metrics.records))
    artifacts.write_json(out / run_files.SUMMARY_FILE, summary)
    return Outcome(trainer.state.global_step, summary=summary, model=trainer.model)


def reference_description(recipe: Recipe) -> str:
    if recipe.train.method == "orpo":
        return "none (ORPO needs no reference model)"
    if recipe.pref.precompute_ref_log_probs:
        where = "precomputed once before training"
    else:
        where = "a second forward pass each step, no second copy in memory"
    held_to = "the SFT adapter it starts from" if recipe.model.adapter else "the base (adapter off)"
    return f"{held_to}, {where}"


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl")
"""TRL's logged preference scalars (its names), summarised at the start and the end of training."""


def training_rewards(records: list[dict]) -> dict:
    """TRL's preference scalars over the first and the last tenth of the logged steps (one step's figures are a
    handful of pairs, too noisy to read alone): `train_<name>_first` / `_last`, names with / as _."""
    logged = [r for r in records if "loss" in r and r.get("step", 0) > 0]
    if not logged:
        return {}
    tenth = max(1, len(logged) // 10)
    out = {}
    for key in REWARD_KEYS:
        for end, part in (("first", logged[:tenth]), ("last", logged[-tenth:])):
            values = [r[key] for r in part if r.get(key) is not None]
            if values:
                out[f"train_{key.replace('/', '_')}_{end}"] = round(sum(values) / len(values), 4)
    return out
