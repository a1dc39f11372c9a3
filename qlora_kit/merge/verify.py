"""Verification: the merged folder must compute what PEFT computes with the unmerged adapter. A few sample
prompts go through both, one model at a time, and the largest logit difference must stay within a tolerance
relative to the largest logit, set per output dtype.

Which reference: a 4-bit run's default merge (--into dequantized) folds the update into the NF4 round trip the run
trained against, so PEFT on the NF4 base is its reference; --into original (and a 16-bit LoRA run's default) folds it
into the original 16-bit weights, whose reference is PEFT on those. Either way the merged
folder is also set against the model the run trained (PEFT on the NF4 base): its logits, its greedy text, and,
beside them, the eval loss on the run's held-out rows of the 16-bit base, the NF4 base, the trained model and the
merged folder. Which merge is the right default is measured on a real model in docs/merge.md."""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_kit.merge.shards import DTYPES

if TYPE_CHECKING:
    from qlora_kit.merge.adapter import Adapter
    from qlora_kit.merge.base import Checkpoint
    from qlora_kit.merge.plan import MergePlan
    from qlora_kit.merge.run_dir import Run
    from qlora_kit.train.eval_loss import EvalLosses

# Verification passes when max |merged - reference| over all logits <= tolerance x the largest |reference logit|.
# Relative, because logit scales differ by orders of magnitude (a random demo model: ~1; a trained 7B: ~30).
# Both models run in the output dtype (RAM: one 16-bit model at a time), so the difference is rounding noise:
# the merged model rounds W + scale*B@A once per weight where the reference keeps W and runs the adapter in
# float32, and deep networks amplify such per-weight roundings layer after layer. Measured with adapters larger
# than the weights they change (a pessimistic case; tools/bench_merge.py, 0.33 B and 0.58 B Qwen2): float16
# 0.41-0.50%, bfloat16 3.2-3.9%, float32 0.00025% of the largest logit, i.e. 8-10 unit roundoffs (2^-11 for
# float16, 2^-8 for bfloat16). The tolerances leave 2.5-4x headroom over that and stay well below what real
# bugs produce (a wrong scale, a missing or transposed update: errors the size of the adapter's own effect,
# printed beside the figure, with a warning whenever the error comes near it).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}

SAMPLE_PROMPTS = (
    "A 45-year-old man has crushing chest pain radiating to his left arm. What is the most likely diagnosis?",
    "What is the first-line treatment for uncomplicated hypertension in adults, and why?",
    "Explain in one sentence why the sky is blue.",
)
MAX_PROMPT_TOKENS = 96


GREEDY_TOKENS = 24
"""New tokens generated greedily per sample prompt, to see whether the merged model writes what the trained one does."""
EVAL_ROWS = 32
"""Held-out rows of the run on which the models' eval losses are set side by side (the first ones of its split)."""


@dataclass
class Verification:
    dtype: str
    reference: str
    device: str
    prompts: int
    positions: int
    max_abs_diff: float
    max_abs_logit: float
    adapter_effect: float
    top1_agreement: float
    against_trained: Verification | None = None
    """The merged folder against the model the run trained (PEFT on the NF4 base), when that is not the reference."""
    greedy_equal: tuple[int, int] = (0, 0)
    """Greedy tokens of the merged folder equal to the trained model's (before the first difference), of all."""
    eval_losses: dict[str, float] = field(default_factory=dict)
    """Eval loss on the run's held-out rows: "16-bit base", "NF4 base", "trained (NF4 base + adapter)", "merged"."""
    eval_rows: int = 0

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.dtype] * self.max_abs_logit

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{self.prompts} prompts, {self.positions} positions: max |Δlogit| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g} = {RELATIVE_TOLERANCE[self.dtype]:g} x largest logit "
                f"{self.max_abs_logit:.3g}), top-1 agreement {100 * self.top1_agreement:.1f}%, "
                f"adapter effect {self.adapter_effect:.3g} → {verdict}")

    def describe_trained(self) -> str:
        """The merged folder against the trained model: logits, and the greedy text."""
        equal, total = self.greedy_equal
        greedy = f"greedy continuations equal for {equal} of {total} tokens"
        if self.against_trained is None:
            return greedy
        t = self.against_trained
        return (f"max |Δlogit| {t.max_abs_diff:.3g} (the adapter's whole effect: {t.adapter_effect:.3g}), top-1 "
                f"agreement {100 * t.top1_agreement:.1f}%, {greedy}")


def memory_for_verification(merged_dir: Path) -> tuple[float, float, str]:
    """(bytes verification needs, bytes free, where): one whole model at a time, i.e. about the merged shards' size
    (twice that on a CPU, which computes in float32), plus a fifth for activations and the loaders' temporaries."""
    shards = sum(f.stat().st_size for f in Path(merged_dir).glob("*.safetensors"))
    if torch.cuda.is_available():
        return 1.2 * shards, float(torch.cuda.mem_get_info()[0]), "GPU memory"
    needed = 1.2 * shards * 4 / bytes_per_weight(merged_dir)
    import psutil

    return needed, float(psutil.virtual_memory().available), "RAM"


def bytes_per_weight(merged_dir: Path) -> int:
    import json

    name = json.loads((Path(merged_dir) / "config.json").read_text(encoding="utf-8")).get("dtype", "float16")
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(name), 2)


def verify_if_it_fits(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, merged_dir: Path,
                      dtype_name: str, console) -> Verification | None:
    """Verify, unless it would need more memory than is free: the merge streams, verification cannot, and a
    16 GB laptop merging a 7B must not be killed (losing the finished merge) for a check."""
    needed, free, where = memory_for_verification(merged_dir)
    if needed > free:
        console.print(f"[yellow]verification skipped:[/] it loads whole models (about {needed / 1024**3:.1f} GiB) "
                      f"and only {free / 1024**3:.1f} GiB of {where} is free. The merged folder is complete; verify "
                      "it where there is more memory, or try it with `python -m qlora_kit.chat`.")
        return None
    return verify(run, base, adapter, plan, merged_dir, dtype_name, console)


def verify(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, merged_dir: Path, dtype_name: str,
           console) -> Verification:
    """Each model once, one at a time: the 16-bit base + adapter (the reference of --into original), the NF4 base +
    adapter (the model the run trained, the reference of --into dequantized), the merged folder. Each gives its
    logits on the sample prompts, its greedy continuations and its eval loss on the run's held-out rows."""
    from transformers import AutoTokenizer

    trust = run.recipe.model.trust_remote_code
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust)
    prompts = [encode_prompt(tokenizer, p) for p in SAMPLE_PROMPTS]
    examples = held_out_examples(run, tokenizer)
    # A CPU computes in float32 whatever the weights' dtype: its float16/bfloat16 matmuls are emulated (17x slower
    # than float32 on an AVX2 CPU), and float32 arithmetic only shrinks the rounding the tolerance allows for.
    compute = dtype_name if device == "cuda" else "float32"
    console.print(f"verifying on {device}, {dtype_name} weights computed in {compute}: {len(prompts)} prompts and "
                  f"{len(examples)} held-out rows "
                  "through base + adapter (PEFT) and the merged folder, one model at a time")
    read = functools.partial(read_model, prompts=prompts, device=device, examples=examples)
    with_original = not plan.prequantized and run.recipe.quant.load_in_4bit
    models = 3 if with_original else 2
    # A line as each model starts and ends: on a CPU each takes minutes, and a log (no terminal, no live view)
    # would otherwise show nothing until the verdict.
    progress = ModelProgress(console, models)
    with progress("the NF4 base + adapter, as trained"):
        trained = read(adapter_model(run, base, adapter, plan, compute, device, quantized=True), with_base=True)
    original = None
    if with_original:
        with progress("the original 16-bit base + adapter"):
            original = read(adapter_model(run, base, adapter, plan, compute, device, quantized=False),
                            with_base=True)
    elif not run.recipe.quant.load_in_4bit:  # 16-bit LoRA: the run trained on the original weights
        original, trained = trained, None
    with progress("the merged folder"):
        merged = read(merged_model(merged_dir, trust, device, compute), with_base=False)

    if plan.into == "dequantized" or original is None:
        reference, what = trained, "PEFT on the NF4 base, as trained"
    else:
        reference, what = original, "PEFT on the original 16-bit base"
    result = compare_logits(reference.logits, merged.logits, reference.base_logits, dtype_name, device, what)
    if trained is not None and reference is not trained:
        result.against_trained = compare_logits(trained.logits, merged.logits, trained.base_logits, dtype_name,
                                                device, "PEFT on the NF4 base, as trained")
    result.greedy_equal = greedy_agreement((trained or original).greedy, merged.greedy)
    result.eval_rows = len(examples)
    for name, reading, losses in (("16-bit base", original, "base_eval"), ("NF4 base", trained, "base_eval"),
                                  ("trained (NF4 base + adapter)", trained, "eval"), ("merged", merged, "eval")):
        if reading is not None and getattr(reading, losses) is not None:
            result.eval_losses[name] = getattr(reading, losses).loss
    style = "green" if result.passed else "red"
    console.print(f"[bold {style}]verification:[/] {result.describe()}")
    console.print(f"[bold]against the trained model[/] (NF4 base + adapter): {result.describe_trained()}")
    if result.eval_losses:
        console.print(f"[bold]eval loss[/] on {len(examples)} held-out rows: " +
                      ", ".join(f"{name} {loss:.4f}" for name, loss in result.eval_losses.items()))
    if result.passed and result.max_abs_diff > 0.5 * result.adapter_effect > 0:
        console.print(f"[yellow]note:[/] the merge error is comparable to the adapter's whole effect: {dtype_name} "
                      "rounding swallows part of this (small) update; --dtype float32 keeps it.")
    return result


class ModelProgress:
    """`with progress("the merged folder"):` prints "model 3/3: the merged folder ..." and then its time."""

    def __init__(self, console, models: int):
        self.console, self.models, self.done = console, models, 0

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        started = time.monotonic()
        self.console.print(f"[dim]  model {self.done}/{self.models}: {what} (logits, greedy text, eval loss) ...")
        yield
        self.console.print(f"[dim]  model {self.done}/{self.models}: done in {time.monotonic() - started:.0f} s")


@dataclass
class Reading:
    """What one model computes on the verification inputs."""

    logits: list[torch.Tensor]
    base_logits: list[torch.Tensor] | None
    """With the adapter switched off (the adapter's effect is the difference)."""
    greedy: list[list[int]]
    eval: EvalLosses | None
    base_eval: EvalLosses | None


def read_model(model, *, prompts: list[torch.Tensor], device: str, examples: list, with_base: bool) -> Reading:
    from qlora_kit.chat.cpu_inference import dequantized_weights
    from qlora_kit.train.eval_loss import evaluate_losses

    try:
        model.eval()
        logits = run_prompts(model, prompts, device)
        with dequantized_weights(model):  # the NF4 reference on a CPU: dequantized once, not once per token
            greedy = greedy_ids(model, prompts, device)
        losses = evaluate_losses(model, examples) if examples else None
        base_logits = base_losses = None
        if with_base:
            with model.disable_adapter():
                base_logits = run_prompts(model, prompts, device)
                base_losses = evaluate_losses(model, examples) if examples else None
        return Reading(logits, base_logits, greedy, losses, base_losses)
    finally:
        del model
        free_memory()


def held_out_examples(run: Run, tokenizer) -> list:
    """The first EVAL_ROWS of the run's own held-out rows, encoded as training encoded them (none without)."""
    import io

    from rich.console import Console

    from qlora_kit.data.examples import build_examples

    if not run.recipe.data.eval_rows:
        return []
    try:
        examples = build_examples(run.recipe, tokenizer, Console(file=io.StringIO()))
    except Exception:  # noqa: BLE001 - the data moved or is offline: the logit checks still stand without it
        return []
    return examples.eval[:EVAL_ROWS]


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[int, int]:
    """Tokens equal before the first difference, summed over the prompts, and all tokens of the reference."""
    equal = 0
    for ref, out in zip(reference, other, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), min(len(ref), len(out)))
        equal += same
    return equal, sum(len(ref) for ref in reference)


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a user turn rendered with the chat template (which adds BOS itself), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids[:MAX_PROMPT_TOKENS]])


def adapter_model(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, dtype_name: str, device: str,
                  quantized: bool):
    """Base + unmerged adapter as PEFT applies it: on the original 16-bit weights, or (quantized) on the run's own
    4-bit model, quantized exactly as it trained (bitsandbytes dequantizes each weight inside the forward pass)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype, recipe = DTYPES[dtype_name], run.recipe
    kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not base.pickled)
    if quantized and not plan.prequantized and recipe.quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.quant.quant_type,
            bnb_4bit_use_double_quant=recipe.quant.double_quant, bnb_4bit_compute_dtype=dtype)
    base_model = AutoModelForCausalLM.from_pretrained(base.folder, **kwargs)
    if device == "cpu":
        # bitsandbytes' CPU inference path would repack the 4-bit weights and compute in bfloat16 whatever the
        # compute dtype; training ran the plain dequantize-then-matmul path, so the reference must as well.
        from qlora_kit.model.loading import keep_cpu_weights_trainable

        keep_cpu_weights_trainable(base_model)
    return PeftModel.from_pretrained(base_model, adapter.folder)


def merged_model(merged_dir: Path, trust_remote_code: bool, device: str, compute: str):
    from transformers import AutoModelForCausalLM

    # Plain loading, as a user of the merged folder does: its own dtype on a GPU, float32 on a CPU (chat's choice).
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto" if device == "cuda" else DTYPES[compute],
                                                device_map={"": device},
                                                trust_remote_code=trust_remote_code)


@torch.inference_mode()
def greedy_ids(model, prompts: list[torch.Tensor], device: str) -> list[list[int]]:
    out = []
    for ids in prompts:
        generated = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                   max_new_tokens=GREEDY_TOKENS, do_sample=False, temperature=None, top_p=None,
                                   top_k=None, use_cache=True)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


@torch.inference_mode()
def run_prompts(model, prompts: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in prompts]


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor], without_adapter: list[torch.Tensor],
                   dtype_name: str, device: str = "cpu", what: str = "") -> Verification:
    positions = sum(r.shape[0] for r in reference)
    agree = sum(int((r.argmax(-1) == m.argmax(-1)).sum()) for r, m in zip(reference, merged, strict=True))
    return Verification(
        dtype=dtype_name, reference=what, device=device, prompts=len(reference), positions=positions,
        max_abs_diff=max(float((r - m).abs().max()) for r, m in zip(reference, merged, strict=True)),
        max_abs_logit=max(float(r.abs().max()) for r in reference),
        adapter_effect=max(float((r - b).abs().max()) for r, b in zip(reference, without_adapter, strict=True)),
        top1_agreement=agree / positions)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
