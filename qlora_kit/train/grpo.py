"""GRPO with verifiable rewards (train.method = "grpo"): TRL's GRPOTrainer on the same 4-bit base + LoRA as SFT, with
the same run directory, checkpoints, interrupts, live view and metrics.

    prompts (qlora_kit.data.checkable) ─► the policy writes grpo.num_generations completions per prompt
    (model.generate, no vLLM) ─► the rewards score them (qlora_kit.train.rewards) ─► each completion's advantage is
    its reward against its group's mean ─► the adapter's policy-gradient step. beta = 0: no reference model.

`fit_grpo` mirrors `qlora_kit.train.fit.fit` and reuses its pieces (precision, checkpointing on a CPU, the
callbacks, the out-of-memory handling); only the trainer and the summary differ.
"""

from __future__ import annotations

import time
from pathlib import Path

from qlora_kit.data.replies import stop_ids
from qlora_kit.distributed import Processes
from qlora_kit.errors import UserError
from qlora_kit.recipe.run_files import ADAPTER_DIR
from qlora_kit.recipe.schema import Recipe
from qlora_kit.recipe.trainer_arguments import grpo_arguments


def trainer_class():
    from trl import GRPOTrainer

    from qlora_kit.train.warmup import WarmupFromTheFirstStep

    class QloraKitGRPOTrainer(WarmupFromTheFirstStep, GRPOTrainer):
        """GRPOTrainer with three changes: prompts are tokenized as SFT tokenizes them (TRL would encode the rendered
        text with add_special_tokens=True: a second BOS after the template's own), memory and tokens/s go into the
        logs like SFT's, and the warmup's first step trains (as SFT's)."""

        bos_id: int | None = None
        _throughput_mark: tuple[float, int] | None = None

        def _tokenize_prompts(self, prompts: list):
            return tokenize_prompts(self.processing_class, self.bos_id, prompts), None, {}

        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs.update(step_scalars(self))
            super().log(logs, start_time)

    return QloraKitGRPOTrainer


def bos_to_add(tokenizer) -> int | None:
    """The BOS id every prompt must start with, for tokenizers that put one in front of text (as the SFT encoder
    decides it); None for those that do not."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def tokenize_prompts(tokenizer, bos_id: int | None, prompts: list[str]) -> list[list[int]]:
    """Rendered prompts -> ids as the SFT encoder builds a prompt: no special tokens added, exactly one BOS."""
    ids = [tokenizer(text=p, add_special_tokens=False)["input_ids"] for p in prompts]
    return ids if bos_id is None else [i if i[:1] == [bos_id] else [bos_id, *i] for i in ids]


def step_scalars(trainer) -> dict:
    """Memory now and at peak, and prompt + completion tokens per second since the last log."""
    from qlora_kit.train.memory_use import snapshot

    mem = snapshot()
    scalars = {f"{mem.kind.lower()}_used_gib": round(mem.used_gib, 4),
               f"{mem.kind.lower()}_peak_gib": round(mem.peak_gib, 4)}
    now, tokens = time.monotonic(), int(trainer.state.num_input_tokens_seen)
    mark = trainer._throughput_mark
    if mark and now > mark[0] and tokens > mark[1]:
        scalars["tokens_per_s"] = round((tokens - mark[1]) / (now - mark[0]), 1)
    trainer._throughput_mark = (now, tokens)
    return scalars


def load_policy(recipe: Recipe, precision):
    """The 4-bit base with a fresh LoRA adapter, or with the trained one model.adapter names (kept trainable)."""
    from qlora_kit.model.loading import add_lora, load_model

    model = load_model(recipe, precision)
    if not recipe.model.adapter:
        return add_lora(model, recipe.lora, seed=recipe.train.seed)
    from peft import PeftModel
    from transformers import set_seed

    set_seed(recipe.train.seed)
    return PeftModel.from_pretrained(model, str(adapter_folder(recipe.model.adapter)), is_trainable=True)


def adapter_folder(path: str) -> Path:
    """model.adapter: a run directory (its adapter/) or an adapter folder; refused before any weight loads."""
    folder = Path(path)
    if (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        return folder / ADAPTER_DIR
    if (folder / "adapter_config.json").is_file():
        return folder
    raise UserError(f"model.adapter = {path}: no adapter there (adapter_config.json, or a run's {ADAPTER_DIR}/).",
                    hint="Name a finished SFT run's output.dir, e.g. runs/medical, or leave model.adapter empty to "
                         "start from a fresh adapter.")


def fit_grpo(recipe: Recipe, tokenizer, examples, out: Path, console, resume_from: Path | None = None,
             resume_step: int = 0, processes: Processes | None = None):
    """Load the policy, train with GRPO (resuming if asked), write the artifacts. Survives Ctrl-C and OOM with a
    checkpoint, as SFT does. `examples`: qlora_kit.data.checkable.GrpoExamples. Returns a fit.Outcome."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from qlora_kit.model.loading import choose_precision, count_parameters, keep_adapter_fp32
    from qlora_kit.recipe import run_files
    from qlora_kit.train import artifacts
    from qlora_kit.train.fit import Outcome, Watchers, checkpointing_on_cpu, train_and_save_adapter
    from qlora_kit.train.rewards import build_rewards
    from qlora_kit.train.trackers import TENSORBOARD_DIR, log_tensorboard_into

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
    console.print(f"model: {recipe.model.display_name} ({label}), {precision.describe()}; GRPO from {start}; "
                  f"LoRA trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if precision.device == "cpu" and recipe.train.gradient_checkpointing:
        recipe = checkpointing_on_cpu(recipe, console)
    processes = processes or Processes()

    eos_ids = stop_ids(model, tokenizer)
    rewards = build_rewards(recipe, tokenizer, eos_ids)
    console.print("rewards: " + ", ".join(f"{r.name} × {r.weight:g}" for r in rewards))
    prompts_per_step = recipe.train.batch_size * recipe.train.grad_accum // recipe.grpo.num_generations
    title = (f"qlora_kit · GRPO · {recipe.model.display_name} · {label} · {prompts_per_step} prompt(s) × "
             f"{recipe.grpo.num_generations} completions a step")
    watch = Watchers.start(out, resume_step, title, console, processes)
    dataset = Dataset.from_list([{"prompt": p.prompt, **p.row.fields()} for p in examples.train])
    args = GRPOConfig(**grpo_arguments(recipe, precision, out, [r.weight for r in rewards]))
    trainer = trainer_class()(model=model, reward_funcs=[r.function for r in rewards], args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=watch.callbacks)
    trainer.bos_id = bos_to_add(tokenizer)
    keep_adapter_fp32(trainer.model)  # after TRL's bf16 cast of quantized-model adapters, before the optimizer
    trainer.remove_callback(PrinterCallback)
    log_tensorboard_into(trainer, out / TENSORBOARD_DIR)
    stopped = train_and_save_adapter(trainer, watch, recipe, out, tokenizer, resume_from, processes)
    if stopped:
        return stopped
    metrics = watch.metrics
    title = f"{recipe.model.display_name} · {label} · GRPO"
    artifacts.write_reward_curve(metrics.records, out / run_files.REWARD_CURVE_FILE, title)
    artifacts.write_loss_curve(metrics.records, out / run_files.CURVE_FILE, title)
    summary = artifacts.summarize(metrics.records, trainer.state.global_step, len(examples.train), trainable, label,
                                  resume_step)
    summary.update(method="grpo", **reward_summary(metrics.records))
    artifacts.write_json(out / run_files.SUMMARY_FILE, summary)
    return Outcome(trainer.state.global_step, summary=summary, model=trainer.model)


def reward_summary(records: list[dict]) -> dict:
    """The training reward at the start and the end (the mean of the first and of the last tenth of the logged
    steps: one step's reward is a handful of completions, too noisy to read alone)."""
    logged = [r for r in records if "reward" in r]
    if not logged:
        return {}
    tenth = max(1, len(logged) // 10)

    def mean(key: str, part: list[dict]) -> float | None:
        values = [r[key] for r in part if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    out = {"train_reward_first": mean("reward", logged[:tenth]), "train_reward_last": mean("reward", logged[-tenth:])}
    clipped = mean("completions/clipped_ratio", logged[-tenth:])
    if clipped is not None:
        out["completions_clipped_last"] = clipped
    return out
