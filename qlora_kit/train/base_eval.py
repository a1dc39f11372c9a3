"""The eval loss of the 16-bit base, the model the user started from, measured before the 4-bit one loads.

A QLoRA run trains on the NF4-quantized base, and its eval loss at step 0 is that quantized model's. Counting the
gain from there credits training with winning back what quantization lost: on SmolLM2-135M most of the first
"improvement" was exactly that (docs/results.md). So the honest "before" is the base in 16 bits, on the same held-out
rows, by the same loss (train/eval_loss.py); the NF4 figure is shown beside it as what 4-bit storage cost.

It needs the whole 16-bit model in memory for a moment, before the NF4 one exists (on a GPU: in VRAM; on a CPU: in
RAM, in float32 as the CPU computes). Where that does not fit (a 7B on an 8 GB card), it is not measured, and every
view says so instead of printing the NF4 figure as "before".
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the views read the records without torch
    from qlora_kit.model.loading import Precision
    from qlora_kit.recipe.schema import Recipe

PREFIX = "base_16bit_eval"
"""metrics.jsonl keys of the measurement (step 0): base_16bit_eval_loss, ..._answer_loss, ..._rows, ..."""
NOT_MEASURED = "base_16bit_not_measured"
"""metrics.jsonl key holding the reason when the 16-bit base could not be evaluated."""
WORKSPACE = 1.2
"""The weights times this, plus HEADROOM_BYTES, must be free: the loaders' temporaries and the activations of one
eval batch (the LM head runs on a few hundred positions at a time)."""
HEADROOM_BYTES = 0.5 * 1024**3


def sixteen_bit_weights_bytes(recipe: Recipe, precision: Precision) -> int:
    """The 16-bit base's weights as the evaluation holds them: every linear layer and the embedding matrices, in the
    compute dtype (float32 on a CPU)."""
    from qlora_kit.plan.estimate import read_architecture

    arch = read_architecture(recipe.model)
    linear = arch.layers * sum(i * o for i, o in arch.linear_shapes().values())
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    return (linear + embeddings) * precision.compute_dtype.itemsize


def free_bytes(precision: Precision) -> int:
    if precision.device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def evaluate_16bit_base(recipe: Recipe, precision: Precision, examples: list, pad_id: int, console,
                        distributed: bool = False, free: int | None = None) -> dict:
    """The metrics.jsonl record (step 0) of the 16-bit base's eval losses, or of the reason it was not measured.
    `free`: the bytes free for it (default: what the GPU or the RAM has free now)."""
    from qlora_kit.errors import UserError

    if distributed:
        return {"step": 0, NOT_MEASURED: "not measured in a multi-process run (each process would need the whole "
                                         "16-bit model at once)"}
    try:
        need = WORKSPACE * sixteen_bit_weights_bytes(recipe, precision) + HEADROOM_BYTES
    except UserError as error:  # an architecture the planner does not know: try it, the loader will say
        console.print(f"[dim]{error.title}")
        need = 0
    free = free_bytes(precision) if free is None else free
    where = "GPU memory" if precision.device == "cuda" else "RAM"
    if need > free:
        return {"step": 0, NOT_MEASURED: f"not measured: the 16-bit base needs about {need / 1024**3:.1f} GiB of "
                                         f"{where} and {free / 1024**3:.1f} GiB is free"}
    console.print(f"[dim]eval loss of the 16-bit base (what you start from), on {len(examples)} held-out rows ...")
    return {"step": 0, **measure(recipe, precision, examples, pad_id)}


def measure(recipe: Recipe, precision: Precision, examples: list, pad_id: int) -> dict:
    import torch

    from qlora_kit.model.loading import load_model
    from qlora_kit.train.eval_loss import evaluate_losses

    started = time.monotonic()
    sixteen_bit = dataclasses.replace(recipe, quant=dataclasses.replace(recipe.quant, load_in_4bit=False),
                                      memory=dataclasses.replace(recipe.memory, embeddings_on_cpu=False))
    model = load_model(sixteen_bit, precision)
    try:
        losses = evaluate_losses(model, examples, recipe.train.batch_size, pad_id)
    finally:
        del model
        gc.collect()
        if precision.device == "cuda":
            torch.cuda.empty_cache()
    return {**losses.metrics(PREFIX), f"{PREFIX}_rows": losses.rows,
            f"{PREFIX}_runtime": round(time.monotonic() - started, 3)}


@dataclass(frozen=True)
class StartingPoints:
    """Where the eval loss started, from metrics.jsonl's step-0 records: what every view sets "now" against."""

    sixteen_bit: dict[str, float]
    """eval_loss / eval_answer_loss / eval_reasoning_loss of the 16-bit base; {} when it was not measured."""
    nf4: dict[str, float]
    """The same of the NF4 base, as the run trains it (the trainer's eval at step 0); {} for a 16-bit LoRA run."""
    not_measured: str = ""
    """Why the 16-bit base has no figure ("" when it has one)."""

    @classmethod
    def from_records(cls, records: list[dict], quantized: bool) -> StartingPoints:
        trainer = next((r for r in records if r.get("step") == 0 and "eval_loss" in r), {})
        trainer_losses = losses_of(trainer, "eval")
        if not quantized:  # a 16-bit LoRA run evaluates the 16-bit base itself at step 0
            return cls(trainer_losses, {})
        own = next((r for r in records if r.get("step") == 0 and (f"{PREFIX}_loss" in r or NOT_MEASURED in r)), {})
        sixteen = {"eval" + key.removeprefix(PREFIX): value for key, value in losses_of(own, PREFIX).items()}
        return cls(sixteen, trainer_losses, own.get(NOT_MEASURED, "") if not sixteen else "")

    def quantization_cost(self) -> float | None:
        """The NF4 base's eval loss less the 16-bit base's: what storing the base in 4 bits cost before training."""
        if "eval_loss" in self.sixteen_bit and "eval_loss" in self.nf4:
            return self.nf4["eval_loss"] - self.sixteen_bit["eval_loss"]
        return None


def losses_of(record: dict, prefix: str) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key.startswith(prefix + "_") and key.endswith("_loss") and value is not None}
