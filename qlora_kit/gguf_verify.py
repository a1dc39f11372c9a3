"""`tools/export_gguf.py --verify`: does the GGUF file compute what the merged folder computes?

The same sample prompts as the merge check (qlora_kit.merge.verify) go through the merged folder and through
the GGUF file as transformers reads it back (`gguf_file=`: it dequantizes and undoes llama.cpp's layouts), one
model at a time, both in float32 so that only the file's own rounding shows: f16 (10 mantissa bits) or q8_0
(8-bit blocks of 32). RAM: 4 bytes per parameter, once, for the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.merge.verify import SAMPLE_PROMPTS, encode_prompt, free_memory, memory_for_verification, run_prompts

# Max |Δlogit| allowed, relative to the largest |logit| of the merged model. Measured on tiny random Qwen2 and
# Llama models (tests/test_export_gguf.py): f16 ~1.3e-3, q8_0 ~3e-2 (q8_0's rounding amplified through the
# layers, and nothing else: the same rounding applied to the original gives the file's logits). A wrong tensor
# layout or a missing bias gives errors of the order of the logits themselves.
RELATIVE_TOLERANCE = {"f16": 1e-2, "q8_0": 1e-1}


@dataclass
class GgufCheck:
    quant: str
    prompts: int
    positions: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.quant] * self.max_abs_logit

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        return (f"{self.prompts} prompts, {self.positions} positions: max |Δlogit| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g} = {RELATIVE_TOLERANCE[self.quant]:g} x largest logit "
                f"{self.max_abs_logit:.3g}), top-1 agreement {100 * self.top1_agreement:.1f}% → "
                f"{'PASS' if self.passed else 'FAIL'}")


def check_gguf(merged_dir: Path, gguf_path: Path, quant: str) -> GgufCheck:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.disable_progress_bar()  # one line of result, not four progress bars
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = [encode_prompt(tokenizer, prompt) for prompt in SAMPLE_PROMPTS]
    reference = logits_of(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), prompts)
    exported = logits_of(AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32), prompts)
    pairs = list(zip(reference, exported, strict=True))
    positions = sum(r.shape[0] for r in reference)
    return GgufCheck(
        quant=quant, prompts=len(prompts), positions=positions,
        max_abs_diff=max(float((r - e).abs().max()) for r, e in pairs),
        max_abs_logit=max(float(r.abs().max()) for r in reference),
        top1_agreement=sum(int((r.argmax(-1) == e.argmax(-1)).sum()) for r, e in pairs) / positions)


def logits_of(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    try:
        return run_prompts(model, prompts, "cpu")
    finally:
        del model
        free_memory()


def verify_export(merged_dir: Path, gguf_path: Path, quant: str) -> int:
    """The --verify step of the command line: prints one line; exit code 0 (pass or skipped) or 1 (fail).
    The GGUF file is written either way: a check that cannot run says why and keeps it."""
    needed, free, where = memory_for_verification(merged_dir)
    needed *= 2  # the merged shards are 16-bit; both models are compared in float32
    if needed > free:
        print(f"verification skipped: it loads whole models in float32 (about {needed / 1024**3:.1f} GiB) and only "
              f"{free / 1024**3:.1f} GiB of {where} is free; {gguf_path} is written.")
        return 0
    try:
        check = check_gguf(merged_dir, gguf_path, quant)
    except Exception as error:  # noqa: BLE001 - transformers' GGUF reader has its own limits; report, keep the file
        print(f"verification could not run ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
              f"{gguf_path} is written.")
        return 1
    print(f"verification (GGUF read back by transformers vs {merged_dir}): {check.describe()}")
    return 0 if check.passed else 1
