"""TRL's SFTTrainer with three changes: the length-grouped batch order is resumable (qlora_kit.train.batch_order),
evaluation is qlora_kit.train.eval_loss's (one token-weighted loss, split into reasoning and answer), and the warmup's
first step trains (qlora_kit.train.warmup); nothing else differs."""

from __future__ import annotations

import time

from qlora_kit.train.batch_order import EpochSeededLengthGroupedSampler


def trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    from qlora_kit.train.warmup import WarmupFromTheFirstStep

    class QloraKitTrainer(WarmupFromTheFirstStep, SFTTrainer):
        eval_examples: list = []
        """The eval rows as qlora_kit.data.encode built them (answer_start included); set by train.build_trainer."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
                return super()._get_train_sampler(train_dataset)
            return EpochSeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                                   [len(ids) for ids in dataset["input_ids"]], self.args.data_seed)

        _throughput_mark: tuple[float, float] | None = None
        """(time, TRL's num_tokens) at the previous training log: tokens/s is over the interval since."""

        def log(self, logs, start_time=None):
            # Memory and throughput go into the logs themselves, so every tracker in output.report_to (TensorBoard,
            # wandb, ...) gets them beside the loss, not only metrics.jsonl.
            if "loss" in logs:
                logs.update(training_scalars(logs, self))
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # Under FSDP every forward is a collective over sharded weights: transformers' own loop handles that.
            if self.is_fsdp_enabled or eval_dataset is not None or not self.eval_examples:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            from qlora_kit.train.eval_loss import evaluate_losses

            started = time.monotonic()
            # The trainer's forward runs under accelerate's autocast (bf16/fp16 on a GPU); ours calls the backbone
            # directly, so it enters the same autocast itself.
            with self.accelerator.autocast():
                losses = evaluate_losses(self.model, self.eval_examples, self.args.per_device_eval_batch_size,
                                         self.processing_class.pad_token_id or 0)
            metrics = {**losses.metrics(metric_key_prefix), f"{metric_key_prefix}_rows": losses.rows,
                       f"{metric_key_prefix}_runtime": round(time.monotonic() - started, 3)}
            # Trainer.log, not SFTTrainer.log: that one would fold the training metrics TRL is still collecting
            # (entropy, token accuracy) into this record and clear them.
            Trainer.log(self, dict(metrics))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return QloraKitTrainer


def training_scalars(logs: dict, trainer) -> dict:
    """Memory now and at peak (VRAM on a GPU, RAM on a CPU), and the trained tokens per second since the last log."""
    from qlora_kit.train.memory_use import snapshot

    mem = snapshot()
    scalars = {f"{mem.kind.lower()}_used_gib": round(mem.used_gib, 4),
               f"{mem.kind.lower()}_peak_gib": round(mem.peak_gib, 4)}
    # TRL adds num_tokens to the logs in its own log(), after this runs: its running count is the same number.
    now, tokens = time.monotonic(), logs.get("num_tokens", getattr(trainer, "_total_train_tokens", None))
    if tokens is not None:
        mark = trainer._throughput_mark
        if mark and now > mark[0] and tokens > mark[1]:
            scalars["tokens_per_s"] = round((tokens - mark[1]) / (now - mark[0]), 1)
        trainer._throughput_mark = (now, tokens)
    return scalars
