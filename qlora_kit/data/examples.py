"""Rows -> prompt/completion pairs -> token ids with the completion mask: the training and held-out examples of a
recipe, with the length policy applied and the data report shown.

    data.source ─► rows (qlora_kit.data.rows) ─► split train / held-out
                ─► prompt + completion (qlora_kit.data.render) ─► token ids + completion mask (qlora_kit.data.encode)
                ─► the length policy: rows over data.max_length dropped (never cut silently), counted in the report
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlora_kit.data.encode import Encoder, apply_length_policy
from qlora_kit.data.render import make_renderer
from qlora_kit.data.report import data_lines, data_notes, show_data
from qlora_kit.data.rows import RowSet, load_rows, split_rows
from qlora_kit.errors import UserError


@dataclass
class Examples:
    train: list
    """Training examples (qlora_kit.encode.Example), after the length policy."""
    eval: list
    """Held-out examples: rows that fit max_length, never truncated (a loss on cut rows is not theirs)."""
    sample_rows: list
    """The rows the end-of-run samples ask about: the held-out ones, else the first training rows."""
    samples_from: str
    data_report: list[str]


def build_examples(recipe, tokenizer, console, rowset: RowSet | None = None) -> Examples:
    """Rows -> prompt/completion pairs -> token ids with the completion mask; reports lengths and drops.
    Each row is encoded once; the eval rows are drawn from those that fit max_length, so data.eval_rows counts
    rows actually evaluated. `rowset`: already read (a local file is read before the libraries load); else read
    here."""
    data = recipe.data
    rowset = rowset or load_rows(data)
    renderer, layout = make_renderer(tokenizer, data)
    encoder = Encoder(tokenizer, renderer)
    encoded = {}

    def encode(row):
        if row.number not in encoded:
            encoded[row.number] = encoder.encode(row)
        return encoded[row.number]

    if data.eval_source:  # held-out rows of their own (make-data: other documents), none taken from the source
        train_rows, _ = split_rows(rowset.rows, dataclasses.replace(data, eval_rows=0), recipe.train.seed)
        eval_rows, eval_examples = rows_of_eval_source(data, encoder)
    else:
        train_rows, eval_rows = split_rows(rowset.rows, data, recipe.train.seed,
                                           usable_for_eval=lambda row: len(encode(row).input_ids) <= data.max_length)
        eval_examples = [encode(r) for r in eval_rows]
    train_examples, lengths = apply_length_policy([encode(r) for r in train_rows], data.max_length, data.over_length)
    notes = data_notes(rowset, data)
    if data.eval_source:
        notes.append(f"eval rows: {len(eval_rows)} from {data.eval_source}")
    if data.eval_rows and len(eval_rows) < data.eval_rows:
        notes.append(f"only {len(eval_rows)} of the {data.eval_rows} eval rows asked for fit max_length = "
                     f"{data.max_length}: the eval loss is over those")
    data_report = data_lines(rowset, layout, len(train_rows), len(eval_rows), lengths, len(train_examples),
                                    notes)
    show_data(console, data_report)
    if not train_examples:
        raise UserError(f"Every training row is longer than data.max_length = {data.max_length} tokens.",
                        hint=f"Raise data.max_length (the longest row has {lengths.percentiles['total']['max']}).")
    if (data.eval_rows or data.eval_source) and not eval_examples:
        raise UserError(f"Every row is longer than data.max_length = {data.max_length} tokens, so there is nothing "
                        "to evaluate on.",
                        hint="Raise data.max_length, or set data.eval_rows = 0 and train.eval_steps = 0 to train "
                             "without eval.")
    if eval_rows:
        sample_rows, samples_from = eval_rows, "held-out eval rows (not trained on)"
    else:
        sample_rows, samples_from = train_rows, "training rows (data.eval_rows = 0, so the model has seen these)"
    return Examples(train_examples, eval_examples, sample_rows[:recipe.samples.count], samples_from, data_report)


def rows_of_eval_source(data, encoder: Encoder) -> tuple[list, list]:
    """data.eval_source's rows that fit max_length (never truncated: a loss on cut rows is not theirs), the first
    data.eval_rows of them in the file's order (0: all), and their examples."""
    held_out = load_rows(dataclasses.replace(data, source=data.eval_source, limit=0))
    rows, examples = [], []
    for row in held_out.rows:
        example = encoder.encode(row)
        if len(example.input_ids) <= data.max_length:
            rows.append(row)
            examples.append(example)
        if data.eval_rows and len(rows) == data.eval_rows:
            break
    return rows, examples
