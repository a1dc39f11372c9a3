"""Build TRL's SFTTrainer from the recipe: completion-only loss, dynamic padding, the right precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.distributed import Processes
from qlora_kit.distributed import current as current_processes
from qlora_kit.errors import UserError
from qlora_kit.model.loading import Precision, keep_adapter_fp32
from qlora_kit.recipe.schema import TILED_MLP_SLICE_TOKENS, Recipe
from qlora_kit.recipe.trainer_arguments import sft_arguments
from qlora_kit.train.trackers import TENSORBOARD_DIR, log_tensorboard_into


def sft_config(recipe: Recipe, precision: Precision, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(**sft_arguments(recipe, precision, output_dir), **recipe.sft)


def build_trainer(recipe: Recipe, model, tokenizer, train_dataset, eval_dataset, precision: Precision,
                  output_dir: Path, callbacks: list):
    from transformers import PrinterCallback

    from qlora_kit.train.sft_trainer import trainer_class

    if recipe.distributed.fsdp and precision.device == "cpu":
        from qlora_kit.distributed import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    trainer = trainer_class()(
        model=model,
        args=sft_config(recipe, precision, output_dir),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if recipe.distributed.fsdp and current_processes().distributed and not trainer.is_fsdp_enabled:
        # Otherwise the run would go on as plain data parallelism, a full copy per process, and say nothing.
        raise UserError("distributed.fsdp = true, but accelerate did not set up FSDP for this launch.",
                        hint="Launch with `torchrun --nproc_per_node N -m qlora_kit.run RECIPE`, or with accelerate "
                             "launch and a config without its own distributed_type (recipes/accelerate_2gpu.yaml).")
    # After SFTTrainer's own bf16 cast of quantized-model adapters, before the optimizer exists.
    keep_adapter_fp32(trainer.model)
    if recipe.memory.tiled_mlp:
        from qlora_kit.model.tiled_mlp import tile_mlps

        tile_mlps(trainer.model)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; StatusCallback replaces it
    log_tensorboard_into(trainer, output_dir / TENSORBOARD_DIR)
    return trainer



@dataclass
class Outcome:
    step: int
    interrupted: str = ""
    """Name of the signal that stopped the run early ("" when it finished)."""
    summary: dict = field(default_factory=dict)
    model: object = None
    """The trained model, still in memory on rank 0 of a finished run: the end-of-run samples ask it questions."""
    sharded: bool = False
    """Trained under FSDP: each rank holds a shard of the weights, so it cannot generate alone."""


def fit(recipe: Recipe, tokenizer, examples, out: Path, console, resume_from: Path | None = None,
        resume_step: int = 0, processes: Processes | None = None) -> Outcome:
    """Load the model, measure the eval loss, train (resuming if asked), measure it again, write the artifacts.
    Survives Ctrl-C and OOM with a checkpoint; a finished run leaves adapter/, loss_curve.png and summary.json.
    `examples`: qlora_kit.data.examples.Examples."""
    from qlora_kit.data.encode import to_dataset
    from qlora_kit.model.loading import add_lora, choose_precision, count_parameters, load_model
    from qlora_kit.recipe import run_files
    from qlora_kit.train import artifacts

    precision = choose_precision(recipe.quant)
    if recipe.train.deterministic:  # before any kernel runs: loading and quantizing the model included
        from transformers import enable_full_determinism

        enable_full_determinism(recipe.train.seed)
    processes = processes or Processes()
    eval_examples = examples.eval
    quantized = recipe.quant.load_in_4bit
    # Before the NF4 model exists: the 16-bit base, what the user starts from, needs the memory to itself.
    # A resumed run measured it when it first started (metrics.jsonl's step 0).
    sixteen_bit = None
    if quantized and eval_examples and not resume_from:
        from qlora_kit.train.base_eval import evaluate_16bit_base

        sixteen_bit = evaluate_16bit_base(recipe, precision, eval_examples, tokenizer.pad_token_id or 0, console,
                                          distributed=processes.distributed)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)
    trainable, total = count_parameters(model)
    label = "RANDOM-INIT weights (demo/benchmark, not a real model)" if recipe.model.init == "random" else "pretrained"
    console.print(f"model: {recipe.model.display_name} ({label}), {precision.describe()}; "
                  f"LoRA trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    if recipe.memory.tiled_mlp and recipe.data.max_length <= TILED_MLP_SLICE_TOKENS:
        console.print(f"[dim]memory.tiled_mlp changes nothing here: every sequence (data.max_length = "
                      f"{recipe.data.max_length}) fits in one {TILED_MLP_SLICE_TOKENS:,}-token slice.")
    if precision.device == "cpu" and (recipe.memory.offload_activations or recipe.memory.embeddings_on_cpu):
        console.print("[dim]memory.offload_activations and memory.embeddings_on_cpu only matter on a GPU; this run "
                      "is on the CPU.")
    if precision.device == "cpu" and recipe.train.gradient_checkpointing:
        recipe = checkpointing_on_cpu(recipe, console)
    global_batch = recipe.train.batch_size * recipe.train.grad_accum * processes.world_size
    title = f"qlora_kit · {recipe.model.display_name} · {label}"
    if processes.distributed:
        title += f" · {processes.world_size} processes, global batch {global_batch}"
    watch = Watchers.start(out, resume_step, title, console, processes, quantized, sixteen_bit)
    train_examples = examples.train
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(train_examples),
                            to_dataset(eval_examples) if eval_examples else None, precision, out, watch.callbacks)
    trainer.eval_examples = eval_examples
    if trainer.is_fsdp_enabled:
        console.print(f"sharding: FSDP2 over {processes.world_size} processes, each holding 1/{processes.world_size} "
                      "of the 4-bit weights and of the adapter")

    def steps():
        if eval_examples and not resume_from:  # a resumed run measured its "before" when it first started
            evaluate_before_training(trainer, len(eval_examples), console)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if eval_examples and not watch.stop.signal_name:
            final_evaluation(trainer)

    interrupted = train_guarded(steps, trainer, watch, recipe, out)
    if interrupted:
        return Outcome(trainer.state.global_step, interrupted=interrupted)
    metrics = watch.metrics
    adapter_state = gathered_adapter(trainer.model) if trainer.is_fsdp_enabled else None
    if not processes.is_main:
        return Outcome(trainer.state.global_step)

    trainer.model.save_pretrained(out / run_files.ADAPTER_DIR, state_dict=adapter_state)
    tokenizer.save_pretrained(out / run_files.ADAPTER_DIR)
    artifacts.write_loss_curve(metrics.records, out / run_files.CURVE_FILE, f"{recipe.model.display_name} · {label}")
    summary = artifacts.summarize(metrics.records, trainer.state.global_step, len(train_examples), trainable, label,
                                  resume_step, quantized=quantized)
    summary.update(processes=processes.world_size, global_batch=global_batch)
    artifacts.write_json(out / run_files.SUMMARY_FILE, summary)
    return Outcome(trainer.state.global_step, summary=summary, model=trainer.model, sharded=trainer.is_fsdp_enabled)


@dataclass
class Watchers:
    """The callbacks every run trains with, SFT and GRPO alike: a clean stop on Ctrl-C / SIGTERM, the final step
    logged, the fault-injection switch of the tests and, on rank 0 only, metrics.jsonl and the live view."""

    stop: object
    metrics: object
    status: object
    callbacks: list

    @classmethod
    def start(cls, out: Path, resume_step: int, title: str, console, processes: Processes, quantized: bool = False,
              sixteen_bit: dict | None = None) -> Watchers:
        """`sixteen_bit`: the metrics record of the 16-bit base's eval (train/base_eval.py), written first; a resumed
        run finds it, and the trainer's own step-0 eval of the NF4 base, in metrics.jsonl."""
        from qlora_kit.recipe.run_files import METRICS_FILE
        from qlora_kit.train.artifacts import LogFinalStep, MetricsRecorder
        from qlora_kit.train.base_eval import StartingPoints
        from qlora_kit.train.interrupts import GracefulStop, InjectOutOfMemory
        from qlora_kit.train.status import StatusCallback

        stop = GracefulStop(console.print)
        callbacks = [stop, LogFinalStep()] + [c for c in [InjectOutOfMemory.from_environment()] if c]
        metrics = status = None
        if processes.is_main:  # the other ranks train in silence and write nothing
            metrics = MetricsRecorder(out / METRICS_FILE, resume_step)
            if sixteen_bit:
                metrics.append(sixteen_bit)
            status = StatusCallback(title, console, quantized=quantized,
                                    start=StartingPoints.from_records(metrics.records, quantized))
            callbacks += [metrics, status]
        return cls(stop, metrics, status, callbacks)


def train_guarded(steps, trainer, watch: Watchers, recipe: Recipe, out: Path) -> str:
    """Run `steps` (training, and the evaluations around it) with Ctrl-C finishing the step and saving a checkpoint,
    and an out-of-memory error saving the last completed step and explaining which knobs to turn. Returns the name
    of the signal that stopped the run, "" when it finished."""
    import torch

    watch.stop.install()
    try:
        steps()
        return watch.stop.signal_name
    except torch.OutOfMemoryError as error:
        if watch.status:
            watch.status.close()
        raise out_of_memory(error, trainer, recipe, out) from None
    finally:
        watch.stop.uninstall()
        if watch.status:
            watch.status.close()


def train_and_save_adapter(trainer, watch: Watchers, recipe: Recipe, out: Path, tokenizer, resume_from: Path | None,
                           processes: Processes) -> Outcome | None:
    """GRPO's and preference tuning's run: train (resuming if asked) under the Ctrl-C / OOM guard, then, on rank 0,
    save the trained adapter alone ("default": TRL may keep a frozen "ref" copy beside it, the reference, not the
    run's result) and the tokenizer. Returns the Outcome of an interrupted run or of a rank other than 0, None when
    rank 0 goes on to write its artifacts."""
    from qlora_kit.recipe.run_files import ADAPTER_DIR

    interrupted = train_guarded(lambda: trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None),
                                trainer, watch, recipe, out)
    if interrupted:
        return Outcome(trainer.state.global_step, interrupted=interrupted)
    if not processes.is_main:
        return Outcome(trainer.state.global_step)
    trainer.model.save_pretrained(out / ADAPTER_DIR, selected_adapters=["default"])
    tokenizer.save_pretrained(out / ADAPTER_DIR)
    return None


def checkpointing_on_cpu(recipe: Recipe, console) -> Recipe:
    """Gradient checkpointing saves GPU memory by recomputing every layer in the backward pass. A CPU has RAM to
    spare for the models one trains on it, and recomputing cost 35-55% more time a step (SmolLM2-135M, 768-token
    rows: 46-57 tokens/s with it, 71-73 without; tools/bench_cpu_speed.py): off, when every layer's activations fit
    in a quarter of the free RAM. The decision is the planner's (qlora_kit.plan.cpu.checkpointing_choice), so the
    CPU plan printed before loading shows what this run does. The recipe on disk keeps its setting."""
    import dataclasses

    import psutil

    from qlora_kit.plan.cpu import checkpointing_choice
    from qlora_kit.plan.estimate import read_architecture

    try:
        arch = read_architecture(recipe.model)
    except UserError:
        return recipe
    choice = checkpointing_choice(arch, recipe, psutil.virtual_memory().available)
    if choice.on:
        return recipe
    console.print(f"[dim]gradient checkpointing {choice.reason}.")
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing=False))


def gathered_adapter(model) -> dict:
    """Under FSDP each rank holds a shard of every adapter weight: gather the trainable ones, and only those, on
    every rank (each `full_tensor()` is a collective, taken in the same order everywhere); rank 0 saves them.
    accelerate's get_state_dict would gather the whole 4-bit base as well, ~18 GB into RAM for a 32B model."""
    return {name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu()
            for name, param in model.named_parameters() if param.requires_grad}


def evaluate_before_training(trainer, rows: int, console) -> None:
    """The eval loss of the base as training starts (LoRA's B matrices are zero: the adapter changes nothing yet),
    logged as step 0: metrics.jsonl, the loss curve and the summary's "before". Before the first step, so its time
    counts neither into tokens/s nor into the ETA."""
    console.print(f"[dim]eval loss before training, on {rows} held-out rows ...")
    trainer.evaluate()


def final_evaluation(trainer) -> dict:
    """Eval loss of the finished adapter; reuses the last periodic evaluation if it ran at the final step."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if last and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def out_of_memory(error, trainer, recipe: Recipe, out: Path):
    """Save the last completed step, then explain what ran out and which knobs to turn (no traceback)."""
    import torch

    from qlora_kit.errors import EXIT_OUT_OF_MEMORY
    from qlora_kit.train.checkpoints import latest_valid_checkpoint
    from qlora_kit.train.memory_use import snapshot

    mem = snapshot()
    step = trainer.state.global_step
    trainer.model.zero_grad(set_to_none=True)  # the half-done step's gradients are what we can free
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        # The weights, optimizer and scheduler are those of the last completed step: consistent to save.
        trainer._save_checkpoint(trainer.model, trial=None)
        saved = f"Saved a checkpoint at step {step}: re-run the same command to resume."
    except Exception as e:  # saving may itself run out of memory; the periodic checkpoint still stands
        checkpoint, at = latest_valid_checkpoint(out)
        saved = (f"Could not save at step {step} ({type(e).__name__}); the newest checkpoint is step {at}."
                 if checkpoint else f"Could not save at step {step}, and no earlier checkpoint exists.")
    resumable = "memory.offload_activations=true, memory.embeddings_on_cpu=true"
    shorter, lower_rank = max(16, recipe.data.max_length // 2), max(1, recipe.lora.r // 2)
    fresh = [f"data.max_length={shorter} (longer rows are dropped, never cut)"] * (shorter < recipe.data.max_length)
    fresh += [f"lora.r={lower_rank}"] * (lower_rank < recipe.lora.r)
    if recipe.train.batch_size > 1:
        fresh.insert(0, f"train.batch_size=1 train.grad_accum={recipe.train.batch_size * recipe.train.grad_accum}")
    # The memory.* switches move things from the GPU to RAM: on a CPU run there is nothing they could free.
    hint = [f"To lower peak memory and resume from the checkpoint, add: {resumable}."] if torch.cuda.is_available() \
        else []
    hint += [f"Or start over (--restart) with: {'; '.join(fresh)}."] if fresh else []
    hint += ["`python -m qlora_kit.plan RECIPE` shows where the memory goes."]
    return UserError(f"Out of {mem.kind} at step {step + 1}: {str(error).splitlines()[0]}",
                     [f"peak {mem.peak_gib:.2f} GiB of {mem.total_gib:.1f} GiB", saved], hint="\n".join(hint),
                     exit_code=EXIT_OUT_OF_MEMORY)
