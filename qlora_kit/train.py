"""Build TRL's SFTTrainer from the recipe: completion-only loss, dynamic padding, the right precision."""

from __future__ import annotations

from pathlib import Path

from qlora_kit.model import Precision, keep_adapter_fp32
from qlora_kit.recipe import Recipe


def optimizer_name(choice: str, precision: Precision) -> str:
    """`auto`: paged 8-bit AdamW on CUDA (optimizer state in 8 bits, paged out under memory pressure),
    plain AdamW on CPU (paging is a CUDA feature and the adapter's state is small anyway)."""
    if choice != "auto":
        return choice
    return "paged_adamw_8bit" if precision.device == "cuda" else "adamw_torch"


def sft_config(recipe: Recipe, precision: Precision, output_dir: Path):
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    evaluate = d.eval_rows > 0 and t.eval_steps > 0
    return SFTConfig(
        output_dir=str(output_dir / "checkpoints"),
        # Rows over max_length were already dropped (or truncated, when asked) and reported by
        # encode.py, so TRL's own truncation never cuts an answer silently.
        max_length=d.max_length,
        completion_only_loss=True,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(t.optim, precision),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        activation_offloading=recipe.memory.offload_activations,
        # Dynamic padding happens in TRL's collator (pad to the longest in the batch); grouping by
        # length keeps that padding small.
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        bf16=precision.amp == "bf16",
        fp16=precision.amp == "fp16",
        use_cpu=precision.device == "cpu",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # the status view replaces the progress bar
        **recipe.sft,
    )


def build_trainer(recipe: Recipe, model, tokenizer, train_dataset, eval_dataset, precision: Precision,
                  output_dir: Path, callbacks: list):
    from transformers import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, precision, output_dir),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # After SFTTrainer's own bf16 cast of quantized-model adapters, before the optimizer exists.
    keep_adapter_fp32(trainer.model)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; StatusCallback replaces it
    return trainer
