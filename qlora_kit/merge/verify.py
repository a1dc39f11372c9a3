"""Verification: the merged folder must compute what PEFT computes with the unmerged adapter. A few sample
prompts go through both, one model at a time, and the largest logit difference must stay within a tolerance
relative to the largest logit, set per output dtype."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_kit.merge.shards import DTYPES

if TYPE_CHECKING:
    from qlora_kit.merge.adapter import Adapter
    from qlora_kit.merge.base import Checkpoint
    from qlora_kit.merge.plan import MergePlan
    from qlora_kit.merge.run_dir import Run

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


def memory_for_verification(merged_dir: Path) -> tuple[float, float, str]:
    """(bytes verification needs, bytes free, where): one whole model in the output dtype at a time, i.e. about
    the merged shards' size, plus a fifth for activations and the loaders' temporaries."""
    needed = 1.2 * sum(f.stat().st_size for f in Path(merged_dir).glob("*.safetensors"))
    if torch.cuda.is_available():
        return needed, float(torch.cuda.mem_get_info()[0]), "GPU memory"
    import psutil

    return needed, float(psutil.virtual_memory().available), "RAM"


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
    from transformers import AutoTokenizer

    trust = run.recipe.model.trust_remote_code
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust)
    prompts = [encode_prompt(tokenizer, p) for p in SAMPLE_PROMPTS]
    console.print(f"verifying on {device}: {len(prompts)} prompts through base + adapter (PEFT) and the merged "
                  f"folder, one model at a time, in {dtype_name}")
    reference, without_adapter = reference_logits(run, base, adapter, plan, dtype_name, prompts, device)
    merged = merged_logits(merged_dir, trust, prompts, device)
    result = compare_logits(reference, merged, without_adapter, dtype_name, device,
                            "PEFT on the NF4 base, as trained" if plan.into == "dequantized"
                            else "PEFT on the original 16-bit base")
    style = "green" if result.passed else "red"
    console.print(f"[bold {style}]verification:[/] {result.describe()}")
    if result.passed and result.max_abs_diff > 0.5 * result.adapter_effect > 0:
        console.print(f"[yellow]note:[/] the merge error is comparable to the adapter's whole effect: {dtype_name} "
                      "rounding swallows part of this (small) update; --dtype float32 keeps it.")
    return result


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a user turn rendered with the chat template (which adds BOS itself), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids[:MAX_PROMPT_TOKENS]])


def reference_logits(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, dtype_name: str,
                     prompts: list[torch.Tensor], device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of base + unmerged adapter as PEFT applies it, and of the base alone (the adapter's effect)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype, recipe = DTYPES[dtype_name], run.recipe
    kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not base.pickled)
    if plan.into == "dequantized" and not plan.prequantized:
        # The run's own 4-bit model: bitsandbytes dequantizes each weight inside the forward pass.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=plan.quant_type, bnb_4bit_use_double_quant=plan.double_quant,
            bnb_4bit_compute_dtype=dtype)
    base_model = AutoModelForCausalLM.from_pretrained(base.folder, **kwargs)
    if device == "cpu":
        # bitsandbytes' CPU inference path would repack the 4-bit weights and compute in bfloat16 whatever the
        # compute dtype; training ran the plain dequantize-then-matmul path, so the reference must as well.
        from qlora_kit.model import keep_cpu_weights_trainable

        keep_cpu_weights_trainable(base_model)
    model = PeftModel.from_pretrained(base_model, adapter.folder)
    try:
        with_adapter = run_prompts(model, prompts, device)
        with model.disable_adapter():
            without_adapter = run_prompts(model, prompts, device)
    finally:
        del model
        free_memory()
    return with_adapter, without_adapter


def merged_logits(merged_dir: Path, trust_remote_code: bool, prompts: list[torch.Tensor], device: str):
    from transformers import AutoModelForCausalLM

    # Plain loading, dtype from config.json: exactly what a user of the merged folder does.
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map={"": device},
                                                 trust_remote_code=trust_remote_code)
    try:
        return run_prompts(model, prompts, device)
    finally:
        del model
        free_memory()


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
