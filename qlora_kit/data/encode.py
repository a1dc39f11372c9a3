"""Tokenize prompt/completion pairs into what the trainer sees, measure lengths, apply the length policy.

We tokenize the prompt and the completion separately and concatenate the ids, instead of letting
TRL tokenize `prompt + completion` as one string, for three reasons:
- TRL encodes plain-text prompts with `add_special_tokens=True`; the R1 chat template already
  writes BOS as text, so that gives two BOS tokens. We encode without special tokens and then make
  sure there is exactly one BOS (for tokenizers that use one).
- the model at inference generates the completion token by token after the prompt's tokens, so the
  boundary must fall exactly where the prompt ends;
- EOS is appended as an id, so it is trained even though `pad_token == eos_token`.
TRL then builds labels from our `completion_mask` (completion-only loss) and pads per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_kit.data.render import Renderer
from qlora_kit.data.rows import Row, row_list
from qlora_kit.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    completion_mask: list[int]
    """1 where the token is trained (reasoning, answer, EOS), 0 for the prompt."""
    row: int
    """Row number in the source data."""
    answer_start: int = -1
    """Index of the first answer token (after the reasoning) in input_ids; -1: not known, all of it is answer."""

    @property
    def labels(self) -> list[int]:
        """Labels exactly as TRL builds them from completion_mask."""
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.completion_mask, strict=True)]

    @property
    def prompt_length(self) -> int:
        return self.completion_mask.index(1) if 1 in self.completion_mask else len(self.input_ids)


@dataclass
class LengthReport:
    max_length: int
    policy: str
    percentiles: dict[str, dict[str, int]]
    """part (prompt/completion/total) -> {p50, p90, p99, max}."""
    over_rows: list[int] = field(default_factory=list)
    """Row numbers longer than max_length."""
    unfixable_rows: list[int] = field(default_factory=list)
    """With `truncate`: rows whose prompt alone fills max_length, so nothing would be left to train; dropped."""
    kept: int = 0

    def lines(self) -> list[str]:
        out = []
        for part, p in self.percentiles.items():
            out.append(f"{part:>10} tokens: p50 {p['p50']:>6}  p90 {p['p90']:>6}  p99 {p['p99']:>6}  max {p['max']:>6}")
        n_over = len(self.over_rows)
        if not n_over:
            out.append(f"all rows fit max_length = {self.max_length}")
        else:
            done = {"drop": "dropped", "error": "refused",
                    "truncate": "truncated: their end is cut, always the EOS and often the whole answer, so the "
                                "model does not learn to finish them"}
            cut = sorted(set(self.over_rows) - set(self.unfixable_rows))
            shown = self.over_rows if self.policy != "truncate" else cut
            out.append(f"{len(shown)} row(s) longer than max_length = {self.max_length}: {done[self.policy]} "
                       f"(rows {row_list(sorted(shown), 5)})")
            if self.unfixable_rows:
                out.append(f"{len(self.unfixable_rows)} row(s) whose prompt alone fills max_length: dropped "
                           f"(rows {row_list(sorted(self.unfixable_rows), 5)})")
        return out


class Encoder:
    def __init__(self, tokenizer, renderer: Renderer):
        self.tokenizer = tokenizer
        self.renderer = renderer
        if tokenizer.eos_token_id is None:
            raise UserError("The tokenizer has no EOS token, so the model could never learn to stop.",
                            hint="Use the model's own tokenizer, or one with an eos_token.")
        self.eos_id = tokenizer.eos_token_id
        # Does this tokenizer put a BOS in front of text? Then every example starts with exactly one.
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None

    def encode(self, row: Row) -> Example:
        pair = self.renderer(row)
        prompt = self.tokenizer(pair.prompt, add_special_tokens=False).input_ids
        completion, answer_offset = self.completion_ids(pair)
        if self.bos_id is not None and prompt[:1] != [self.bos_id]:
            prompt = [self.bos_id] + prompt
        return Example(prompt + completion, [0] * len(prompt) + [1] * len(completion), row.number,
                       len(prompt) + answer_offset)

    def completion_ids(self, pair) -> tuple[list[int], int]:
        """The completion's ids (EOS appended) and the index of its first answer token: the first token that starts
        at or after the answer's first character (a token that straddles the boundary counts as reasoning)."""
        if self.tokenizer.is_fast:
            encoded = self.tokenizer(pair.completion, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded.input_ids
            starts = [start for start, _ in encoded.offset_mapping]
            answer = next((i for i, start in enumerate(starts) if start >= pair.answer_start), len(ids))
        else:  # no offsets: the reasoning's own token count
            ids = self.tokenizer(pair.completion, add_special_tokens=False).input_ids
            answer = len(self.tokenizer(pair.completion[:pair.answer_start], add_special_tokens=False).input_ids)
        return ids + [self.eos_id], answer


def encode_rows(encoder: Encoder, rows: list[Row]) -> list[Example]:
    return [encoder.encode(row) for row in rows]


def apply_length_policy(examples: list[Example], max_length: int, policy: str) -> tuple[list[Example], LengthReport]:
    """Measure lengths, then drop / truncate / refuse rows over max_length. Never cuts silently."""
    report = LengthReport(max_length, policy, _percentiles(examples))
    report.over_rows = [e.row for e in examples if len(e.input_ids) > max_length]
    if report.over_rows and policy == "error":
        raise UserError(f"{len(report.over_rows)} of {len(examples)} rows are longer than data.max_length = "
                        f"{max_length} tokens (rows {row_list(report.over_rows, 5)}).",
                        hint="Raise data.max_length, or set data.over_length = 'drop' to leave them out.")
    kept = []
    for example in examples:
        if len(example.input_ids) <= max_length:
            kept.append(example)
        elif policy == "truncate" and example.prompt_length < max_length:
            kept.append(Example(example.input_ids[:max_length], example.completion_mask[:max_length], example.row,
                                min(example.answer_start, max_length)))
        elif policy == "truncate":
            report.unfixable_rows.append(example.row)
    report.kept = len(kept)
    return kept, report


def _percentiles(examples: list[Example]) -> dict[str, dict[str, int]]:
    parts = {
        "prompt": sorted(e.prompt_length for e in examples),
        "completion": sorted(len(e.input_ids) - e.prompt_length for e in examples),
        "total": sorted(len(e.input_ids) for e in examples),
    }
    return {name: _summary(values) for name, values in parts.items()}


def _summary(values: list[int]) -> dict[str, int]:
    def at(q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": values[-1] if values else 0}


def to_dataset(examples: list[Example]):
    """A `datasets.Dataset` with input_ids + completion_mask: TRL skips its own tokenization for it."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                              "completion_mask": [e.completion_mask for e in examples]})


def answer_mask(example: Example) -> list[int]:
    """1 on the answer tokens (from answer_start, EOS included), 0 elsewhere (prompt and reasoning)."""
    start = example.answer_start if example.answer_start >= 0 else example.prompt_length
    return [int(i >= start and m == 1) for i, m in enumerate(example.completion_mask)]
