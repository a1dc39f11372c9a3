"""`tools/export_gguf.py --verify`: does the GGUF file compute what the merged folder computes?

The same sample prompts as the merge check (qlora_kit.merge.verify), rendered with the chat template, go
through the merged folder and through the GGUF file as transformers reads it back (`gguf_file=`: it
dequantizes and undoes llama.cpp's layouts), one model at a time, both in float32 so that only the file's own
rounding shows: f16 (10 mantissa bits: exact for bf16 weights) or q8_0 (8-bit blocks of 32). Two measures:
  * logits: max |Δlogit| against a tolerance relative to the largest logit, and top-1 agreement per position;
  * greedy agreement: the first GREEDY_TOKENS tokens each model generates greedily from each prompt, and how
    many of them (counted from the start, up to the first difference) are the same: what a user would see.
The pass/fail verdict is the logit tolerance; greedy agreement is reported (one near-tie flipped by q8_0's
rounding changes every token after it, without anything being wrong with the file).
RAM: 4 bytes per parameter, once, for the larger of the two models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch

from qlora_kit.merge.verify import (
    SAMPLE_PROMPTS,
    encode_prompt,
    free_memory,
    greedy_agreement,
    memory_for_verification,
)

# Max |Δlogit| allowed, relative to the largest |logit| of the merged model. Measured on tiny random Qwen2 and
# Llama models (tests/test_export_gguf.py): f16 ~1.3e-3, q8_0 ~3e-2 (q8_0's rounding amplified through the
# layers, and nothing else: the same rounding applied to the original gives the file's logits). On SmolLM2-135M
# (bench/results/gguf_quality.json) q6_k 0.064, q4_k_m 0.19, q5_k_m 0.29; on SmolLM2 fine-tuned 16 steps by the
# real-model test q6_k 0.15, q5_k_m 0.37, q4_k_m 0.60 (a 135M model's logits move that much under 4-5 bit
# rounding; its Q5_0/Q5_1 fallbacks carry most of it). The bounds sit above those; top-1 agreement is the
# measure that tells a rounding from a broken file (a wrong layout agrees almost nowhere).
RELATIVE_TOLERANCE = {"f16": 1e-2, "bf16": 3e-2, "q8_0": 1e-1, "q6_k": 0.3, "q5_k_m": 0.6, "q5_k_s": 0.6,
                      "q5_0": 0.6, "q4_k_m": 0.8, "q4_k_s": 0.8, "q4_0": 0.8}
GREEDY_TOKENS = 16


@dataclass
class GgufCheck:
    quant: str
    prompts: int
    positions: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    greedy: list[tuple[int, int]] = field(default_factory=list)  # per prompt: (tokens agreeing, tokens generated)

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.quant] * self.max_abs_logit

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def greedy_agreeing(self) -> int:
        return sum(agree for agree, _ in self.greedy)

    @property
    def greedy_total(self) -> int:
        return sum(total for _, total in self.greedy)

    def describe(self) -> str:
        greedy = ", ".join(f"{agree}/{total}" for agree, total in self.greedy)
        return (f"{self.prompts} prompts, {self.positions} positions: max |Δlogit| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g} = {RELATIVE_TOLERANCE[self.quant]:g} x largest logit "
                f"{self.max_abs_logit:.3g}), top-1 agreement {100 * self.top1_agreement:.1f}%, greedy tokens "
                f"agreeing {greedy} → {'PASS' if self.passed else 'FAIL'}")


# ---------------------------------------------------------------------------------------------------------------
# Reading the GGUF file back


@contextmanager
def gguf_loading() -> Iterator[None]:
    """transformers 5's GGUF loader, quiet and faster: its tensor loop has a tqdm bar of its own (not covered by
    transformers.logging.disable_progress_bar), it parses the file twice (config, then tensors) and it rebuilds
    gguf's tensor-name table once per module (397 times for a 30-layer model). The two gguf-py entry points it
    imports on each call are memoized for the duration: the same read-only objects, built once."""
    import gguf
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map
    transformers.logging.disable_progress_bar()
    gguf_utils.tqdm = partial(saved[0], disable=True)
    gguf.GGUFReader = lru_cache(maxsize=2)(saved[1])
    gguf.get_tensor_name_map = lru_cache(maxsize=8)(saved[2])
    try:
        yield
    finally:
        gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map = saved


def load_gguf(gguf_path: Path):
    """The GGUF file as a float32 transformers model, in eval mode."""
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    with gguf_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


def load_merged(merged_dir: Path):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()  # one line of result, not a progress bar per load
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------
# Measures


def greedy_tokens(model, tokenizer, prompt: str, n: int = GREEDY_TOKENS) -> list[int]:
    """The ids `model` generates greedily (argmax, no sampling settings) after `prompt` rendered with the chat
    template: n of them, fewer where it ends its turn (EOS, included)."""
    return continuation(model, encode_prompt(tokenizer, prompt), tokenizer.eos_token_id, n)[1]


@torch.no_grad()
def continuation(model, ids: torch.Tensor, eos_id: int | None, n: int) -> tuple[torch.Tensor, list[int]]:
    """(the logits at every prompt position, the greedy continuation): one loop for both models, so that nothing
    but their logits can make the continuations differ, and the prompt's pass serves both measures."""
    out = model(input_ids=ids, use_cache=True)
    logits, generated = out.logits[0].float(), []
    while True:
        next_id = int(out.logits[0, -1].argmax())
        generated.append(next_id)
        if len(generated) == n or next_id == eos_id:
            return logits, generated
        out = model(input_ids=torch.tensor([[next_id]]), use_cache=True, **cache_of(out))


def cache_of(output) -> dict:
    """The key/value cache to pass back: `cache` in transformers >= 5.24, `past_key_values` before."""
    if getattr(output, "cache", None) is not None:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def outputs_of(model, tokenizer, prompts: list[str], greedy: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(logits per prompt, greedy continuation per prompt); the model is freed afterwards."""
    try:
        results = [continuation(model, encode_prompt(tokenizer, prompt), tokenizer.eos_token_id, greedy)
                   for prompt in prompts]
        return [logits for logits, _ in results], [tokens for _, tokens in results]
    finally:
        del model
        free_memory()


def check_gguf(merged_dir: Path, gguf_path: Path, quant: str, prompts: tuple[str, ...] = SAMPLE_PROMPTS,
               greedy: int = GREEDY_TOKENS) -> GgufCheck:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reference, reference_tokens = outputs_of(load_merged(merged_dir), tokenizer, list(prompts), greedy)
    exported, exported_tokens = outputs_of(load_gguf(gguf_path), tokenizer, list(prompts), greedy)
    pairs = list(zip(reference, exported, strict=True))
    positions = sum(r.shape[0] for r in reference)
    return GgufCheck(
        quant=quant, prompts=len(prompts), positions=positions,
        max_abs_diff=max(float((r - e).abs().max()) for r, e in pairs),
        max_abs_logit=max(float(r.abs().max()) for r in reference),
        top1_agreement=sum(int((r.argmax(-1) == e.argmax(-1)).sum()) for r, e in pairs) / positions,
        greedy=[greedy_agreement([r], [e]) for r, e in zip(reference_tokens, exported_tokens, strict=True)])


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
