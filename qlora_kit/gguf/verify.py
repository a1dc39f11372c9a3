"""`tools/export_gguf.py --verify`: does the GGUF file hold the merged folder's weights, and compute what it computes?

The file is read back by transformers (`gguf_file=`: it dequantizes with the `gguf` package and undoes
llama.cpp's layouts, an interpreter independent of the export's own code) and set against the merged folder on
three measures, each with a bound per file type that sits between what that type's rounding does and what a
damaged file does (measured: docs/gguf.md, `python tools/measure_gguf.py verify`):

  * weights: every tensor of the merged folder against the file's, as relative RMS error
    ||W_file - W_folder|| / ||W_folder||. Block rounding bounds it (q8_0 ~0.004, q4_k ~0.1 of the tensor's RMS);
    a wrong scale, a swapped or missing tensor puts it at 0.5 and more, on a 135M model as on a 70B.
  * next-token distributions: the merged folder writes its own greedy continuation of each sample prompt
    (GREEDY_TOKENS), then both models read the same tokens in one forward pass each, and the mean KL divergence
    of the file's next-token distribution from the folder's is taken over every position. This is what catches
    what the weights do not show: a header the reader takes differently (rope base, norm epsilon, head counts).
  * greedy agreement, teacher-forced: of the folder's own greedy tokens, how many the file also ranks first
    at the same position. Free-running agreement (each model continuing its own text) is printed too but not
    judged: one near-tie flipped by rounding changes every token after it without anything being wrong.

Both models run in float32, one at a time (the folder's tensors are read one by one from its shards for the
weight measure): RAM is 4 bytes per parameter, once.
"""

from __future__ import annotations

import math
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

GREEDY_TOKENS = 32
"""Tokens of the folder's own greedy continuation per prompt: 3 prompts give ~90 judged tokens."""

TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_l", "q3_k_m",
         "q3_k_s")

# The bounds, per file type. Measured (bench/results/gguf_verify.json) on SmolLM2-135M-Instruct's 16-bit folder,
# on it fine-tuned 8 steps and merged, and on a tiny random Llama; damaged copies of each file (one tensor's scale
# x2, x0.5 or x-1, two tensors swapped) measured against the same bounds. See docs/gguf.md for the table.
# The q3 types' (tools/measure_gguf.py verify): weights 0.152-0.158 off as written on SmolLM2 and the tiny model, 1.0
# and more with one tensor's scales x2; KL 0.56 (SmolLM2 q3_k_s), 0.18-0.47 (tiny); the tiny random model's greedy
# share 0.48 (q3_k_s) to 0.57, SmolLM2's 0.77 (q3_k_s).
WEIGHT_TOLERANCE = {"f16": 0.005, "bf16": 0.01, "q8_0": 0.03, "q6_k": 0.06, "q5_k_m": 0.12, "q5_k_s": 0.12,
                    "q5_0": 0.12, "q4_k_m": 0.25, "q4_k_s": 0.25, "q4_0": 0.25, "q3_k_l": 0.35, "q3_k_m": 0.35,
                    "q3_k_s": 0.35}
"""Largest relative RMS error of any tensor (1-D ones, norms and biases, are stored f32: exact in every type)."""
KL_TOLERANCE = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.05, "q6_k": 0.1, "q5_k_m": 0.3, "q5_k_s": 0.3, "q5_0": 0.3,
                "q4_k_m": 0.3, "q4_k_s": 0.3, "q4_0": 1.5, "q3_k_l": 1.2, "q3_k_m": 1.2, "q3_k_s": 1.5}
"""Mean KL divergence (nats) of the file's next-token distribution from the folder's."""
GREEDY_FLOOR = {"f16": 0.95, "bf16": 0.9, "q8_0": 0.85, "q6_k": 0.8, "q5_k_m": 0.7, "q5_k_s": 0.7, "q5_0": 0.7,
                "q4_k_m": 0.6, "q4_k_s": 0.55, "q4_0": 0.5, "q3_k_l": 0.45, "q3_k_m": 0.45, "q3_k_s": 0.4}
"""Least share of the folder's own greedy tokens the file ranks first (teacher-forced). Measured as written: real
models 0.74 (the demo's q4_0) to 1.0; the tiny random model of the tests, whose near-uniform distributions flip on
any rounding, 0.60 (q4_0) and 0.63 (q4_k_s): the 4-bit floors leave room for it; the weights and the KL catch the
damage there (a damaged tensor is off by 0.5 of its RMS or more, rounding by 0.09 at most)."""


@dataclass
class GgufCheck:
    quant: str
    prompts: int
    positions: int
    tensors: int
    worst_tensor: str
    weight_error: float          # the largest relative RMS error of any tensor
    missing: list[str]           # folder tensors the file's model does not have (or has in another shape)
    kl_mean: float
    top1_agreement: float        # over every position
    forced: tuple[int, int]      # (the folder's greedy tokens the file ranks first, those tokens)
    greedy: list[tuple[int, int]] = field(default_factory=list)  # free-running, per prompt (not judged)

    @property
    def forced_share(self) -> float:
        return self.forced[0] / self.forced[1] if self.forced[1] else 1.0

    def failures(self) -> list[str]:
        """What is out of bounds, in words; empty when the file passes."""
        bad = []
        if self.missing:
            bad.append(f"{len(self.missing)} tensors of the folder missing or misshapen in the file "
                       f"({', '.join(self.missing[:3])})")
        if not self.weight_error <= WEIGHT_TOLERANCE[self.quant]:
            bad.append(f"weights: {self.worst_tensor} is off by {self.weight_error:.3g} of its RMS, beyond "
                       f"{self.quant} rounding ({WEIGHT_TOLERANCE[self.quant]:g})")
        if not self.kl_mean <= KL_TOLERANCE[self.quant]:
            bad.append(f"next-token KL {self.kl_mean:.3g} nats beyond {KL_TOLERANCE[self.quant]:g}")
        if not self.forced_share >= GREEDY_FLOOR[self.quant]:
            bad.append(f"greedy agreement {100 * self.forced_share:.0f} % below {100 * GREEDY_FLOOR[self.quant]:.0f} %")
        return bad

    @property
    def passed(self) -> bool:
        return not self.failures()

    @property
    def greedy_agreeing(self) -> int:
        return self.forced[0]

    @property
    def greedy_total(self) -> int:
        return self.forced[1]

    def describe(self) -> str:
        free = ", ".join(f"{agree}/{total}" for agree, total in self.greedy)
        failures = self.failures()
        return (f"{self.prompts} prompts, {self.positions} positions, {self.tensors} tensors ({self.quant}): "
                f"weights off by at most {self.weight_error:.3g} of a tensor's RMS (bound "
                f"{WEIGHT_TOLERANCE[self.quant]:g}); next-token KL {self.kl_mean:.3g} nats (bound "
                f"{KL_TOLERANCE[self.quant]:g}); the folder's own greedy tokens ranked first "
                f"{self.forced[0]}/{self.forced[1]} = {100 * self.forced_share:.0f} % (floor "
                f"{100 * GREEDY_FLOOR[self.quant]:.0f} %); top-1 agreement {100 * self.top1_agreement:.1f} % of "
                f"positions; free-running, tokens equal before the first difference {free} (not judged: one "
                f"near-tie changes the rest) → " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))

    def row(self) -> dict:
        """The figures for bench/results/gguf_verify.json."""
        return {"weight_error": round(self.weight_error, 5), "worst_tensor": self.worst_tensor,
                "kl_mean": round(self.kl_mean, 5), "greedy_forced": list(self.forced),
                "greedy_forced_share": round(self.forced_share, 4), "top1_agreement": round(self.top1_agreement, 4),
                "greedy_free_running": [agree for agree, _ in self.greedy], "positions": self.positions,
                "missing": len(self.missing)}


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


@torch.no_grad()
def continuation(model, ids: torch.Tensor, eos_id: int | None, n: int) -> list[int]:
    """The greedy continuation of `ids` (argmax, no sampling settings): n tokens or up to EOS (included)."""
    out = model(input_ids=ids, use_cache=True)
    generated = []
    while True:
        next_id = int(out.logits[0, -1].argmax())
        generated.append(next_id)
        if len(generated) == n or next_id == eos_id:
            return generated
        out = model(input_ids=torch.tensor([[next_id]]), use_cache=True, **cache_of(out))


def greedy_tokens(model, tokenizer, prompt: str, n: int = GREEDY_TOKENS) -> list[int]:
    """The ids `model` generates greedily after `prompt` rendered with the chat template."""
    return continuation(model, encode_prompt(tokenizer, prompt), tokenizer.eos_token_id, n)


def cache_of(output) -> dict:
    """The key/value cache to pass back: `cache` in transformers >= 5.24, `past_key_values` before."""
    if getattr(output, "cache", None) is not None:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


@torch.no_grad()
def log_probs(model, sequence: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits at every position of `sequence` (1, n), float32: one forward pass,
    the same for both models, so that only their weights and headers can make the two differ."""
    return torch.log_softmax(model(input_ids=sequence).logits[0].float(), dim=-1)


@dataclass
class Reference:
    """What the merged folder computes on the sample prompts: per prompt, the tokens both models read (the
    prompt, then the folder's own greedy continuation less its last token), where the continuation's
    predictions start, the continuation, and the folder's next-token log-probabilities at every position."""
    merged_dir: Path
    sequences: list[torch.Tensor]
    starts: list[int]
    continuations: list[list[int]]
    log_probs: list[torch.Tensor]
    eos_id: int | None


def reference_outputs(merged_dir: Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS,
                      greedy: int = GREEDY_TOKENS) -> Reference:
    """The merged folder's side, computed once (a measurement of several files reuses it); the model is freed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = load_merged(merged_dir)
    try:
        sequences, starts, continuations, lps = [], [], [], []
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt)
            tokens = continuation(model, ids, tokenizer.eos_token_id, greedy)
            sequence = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=torch.long)], dim=1)
            sequences.append(sequence)
            starts.append(ids.shape[1] - 1)  # the position whose next token is the continuation's first
            continuations.append(tokens)
            lps.append(log_probs(model, sequence))
        return Reference(Path(merged_dir), sequences, starts, continuations, lps, tokenizer.eos_token_id)
    finally:
        del model
        free_memory()


def weight_errors(merged_dir: Path, model) -> tuple[int, str, float, list[str]]:
    """(tensors compared, the worst one, its relative RMS error, missing names): every tensor of the folder's
    shards, read one at a time, against the file's model's tensor of that name (a tied output is the embedding)."""
    from safetensors import safe_open

    state = model.state_dict()
    count, worst, worst_name, missing = 0, -1.0, "", []
    for shard in sorted(Path(merged_dir).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                expected = f.get_tensor(name).float()
                got = state.get(name)
                if got is None or tuple(got.shape) != tuple(expected.shape):
                    missing.append(name)
                    continue
                count += 1
                scale = float(expected.norm())
                error = float((got.float() - expected).norm()) / scale if scale else float(got.abs().max())
                if not math.isfinite(error):
                    error = math.inf
                if error > worst:
                    worst, worst_name = error, name
    return count, worst_name, max(worst, 0.0), missing


def compare(reference: Reference, model, quant: str) -> GgufCheck:
    """The file's model (loaded) against the folder's outputs, on the same token sequences; the model is freed."""
    try:
        tensors, worst_name, worst, missing = weight_errors(reference.merged_dir, model)
        kls, top1, forced, greedy = [], 0, 0, []
        for sequence, start, tokens, ref in zip(reference.sequences, reference.starts, reference.continuations,
                                                reference.log_probs, strict=True):
            got = log_probs(model, sequence)
            kls.append((ref.exp() * (ref - got)).sum(-1))
            top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
            forced += int((got[start:].argmax(-1) == torch.tensor(tokens)).sum())
            own = continuation(model, sequence[:, :start + 1], reference.eos_id, len(tokens))
            greedy.append(greedy_agreement([tokens], [own]))
        kl = torch.cat(kls)
        kl_mean = float(kl.mean()) if bool(torch.isfinite(kl).all()) else math.inf
        return GgufCheck(quant=quant, prompts=len(reference.sequences), positions=kl.numel(), tensors=tensors,
                         worst_tensor=worst_name, weight_error=worst, missing=missing,
                         kl_mean=kl_mean, top1_agreement=top1 / kl.numel(),
                         forced=(forced, sum(map(len, reference.continuations))), greedy=greedy)
    finally:
        del model
        free_memory()


def check_gguf(merged_dir: Path, gguf_path: Path, quant: str, prompts: tuple[str, ...] = SAMPLE_PROMPTS,
               greedy: int = GREEDY_TOKENS, reference: Reference | None = None) -> GgufCheck:
    reference = reference or reference_outputs(merged_dir, prompts, greedy)
    return compare(reference, load_gguf(gguf_path), quant)


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
