"""Preference rows (train.method = "dpo", "kto", "orpo"): read and checked before any weight loads, each side
rendered exactly as SFT renders a completion, encoded with one BOS and EOS as an id, the length policy applied to
whole pairs.

Two layouts, in .jsonl/.json/.csv/.parquet or a hub data set:

    {"prompt": "A 45-year-old ...", "chosen": "<think>...</think>The answer ...", "rejected": "The answer is ..."}
    {"prompt": "A 45-year-old ...", "completion": "<think>...</think>The answer ...", "label": true}      (KTO)

- paired (DPO, ORPO, KTO): a better and a worse answer to the same prompt. KTO unpairs them (chosen: good, rejected:
  bad), as TRL does.
- rated (KTO only): one answer marked good (`label` true) or bad (false).

A side is text or TRL's conversational format (a list of {"role", "content"} messages: the prompt's user turn and an
optional system turn, an assistant turn per side; the prompt may also be left out when `chosen` and `rejected` are
whole conversations sharing it). A side holding `<think>...</think>answer` is reasoning + answer, rendered as SFT
renders them: the chat template's generation prompt, one think block, the answer, EOS. Without a think block the
reasoning is empty, as an SFT row without reasoning is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from qlora_kit.data.rows import Row, read_source_records, read_turns, row_list, split_rows, split_thinking
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import DataSection


@dataclass(frozen=True)
class Side:
    cot: str
    response: str


@dataclass(frozen=True)
class PreferenceRow:
    question: str
    system: str
    number: int
    """1-based row number in the source (the line number for .jsonl)."""
    chosen: Side | None = None
    rejected: Side | None = None
    """A pair: both sides. A rated row (KTO): `chosen` holds the answer when its label is good, `rejected` when bad."""

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def row(self, side: Side) -> Row:
        """One side as the SFT row it would be: what the renderer and the end-of-run samples read."""
        return Row(self.question, side.cot, side.response, self.number, self.system)


@dataclass
class PreferenceSet:
    train: list[PreferenceRow]
    held_out: list[PreferenceRow]
    source: str
    paired: int
    rated: int


@dataclass(frozen=True)
class PairExample:
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    """The chosen side's completion ids, EOS included; the prompt is not repeated."""
    rejected_ids: list[int]

    def fields(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


@dataclass(frozen=True)
class RatedExample:
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool

    def fields(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "label": self.label}


@dataclass
class PreferenceExamples:
    train: list
    """PairExample (DPO, ORPO) or RatedExample (KTO), after the length policy."""
    held_out: list
    """Held-out rows as the training ones (pairs, or KTO's rated rows): judged before and after."""
    sample_rows: list[Row]
    """The prompts the end-of-run samples ask, with the chosen answer as the reference."""
    samples_from: str
    data_report: list[str]

    @property
    def eval(self) -> list:  # what the planner reads for SFT's eval lengths: not used by preference runs
        return []


# ------------------------------------------------------------------------------------------------- reading


def load_preference_rows(data: DataSection, method: str, seed: int) -> PreferenceSet:
    """Read and check every row (a bad one stops the run with its line number), then shuffle with the seed, apply
    data.limit and hold out data.eval_rows, as SFT splits."""
    records, origin = read_source_records(data)
    if not records:
        raise UserError(f"{origin}: the data set has no rows.", hint="Point data.source at a file with rows.")
    rows, bad = [], {}
    for number, record in enumerate(records, start=1):
        row = preference_row(record, number, data.question_column)
        if isinstance(row, str):
            bad.setdefault(row, []).append(number)
        elif not row.paired and method != "kto":
            bad.setdefault(f"a single rated answer (`completion` + `label`): {method.upper()} needs pairs "
                           "(`chosen` + `rejected`); train.method = \"kto\" reads rated answers", []).append(number)
        else:
            rows.append(row)
    if bad:
        raise UserError(f"{origin}: {sum(map(len, bad.values()))} of the {len(records)} rows cannot be used for "
                        f"{method.upper()}.",
                        [f"{problem}: row{'s' if len(numbers) > 1 else ''} {row_list(numbers)}"
                         for problem, numbers in bad.items()],
                        hint="Each row needs `prompt` and either `chosen` + `rejected` (a better and a worse answer) "
                             "or, for KTO, `completion` + `label` (true: good, false: bad); text, or chat messages "
                             "as TRL's conversational format. docs/preference.md shows both. Row numbers count from "
                             "1 (the line number in a .jsonl).")
    train, held_out = split_rows(rows, data, seed)
    paired = sum(r.paired for r in rows)
    return PreferenceSet(train, held_out, origin, paired, len(rows) - paired)


def preference_row(record: dict, number: int, question_column: str = "") -> PreferenceRow | str:
    """One record as a PreferenceRow, or what is wrong with it."""
    prompt = record.get("prompt", record.get(question_column) if question_column else None)
    if "chosen" in record or "rejected" in record:
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if chosen is None or rejected is None:
            return f"`{'rejected' if chosen is not None else 'chosen'}` is missing"
        if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
            # TRL's implicit prompt: whole conversations that share everything but their last turn.
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
            if prompt != record["rejected"][:-1]:
                return "`chosen` and `rejected` conversations differ before their last turn (no shared prompt)"
        question = read_prompt(prompt)
        if isinstance(question, str):
            return question
        sides = [read_side(chosen, "chosen"), read_side(rejected, "rejected")]
        problem = next((s for s in sides if isinstance(s, str)), None)
        if problem:
            return problem
        if sides[0] == sides[1]:
            return "`chosen` is the same as `rejected`: nothing to prefer"
        return PreferenceRow(question[1], question[0], number, sides[0], sides[1])
    if "completion" in record:
        label = record.get("label")
        if isinstance(label, float) or label not in (True, False, 0, 1):
            return "`label` is missing or not true / false (good or bad answer)"
        question = read_prompt(prompt)
        if isinstance(question, str):
            return question
        side = read_side(record["completion"], "completion")
        if isinstance(side, str):
            return side
        return PreferenceRow(question[1], question[0], number, side if label else None, None if label else side)
    return "no `chosen` + `rejected` (a pair) and no `completion` + `label` (a rated answer)"


def read_prompt(prompt: Any) -> tuple[str, str] | str:
    """(system, question) from a prompt as text or chat messages, or what is wrong with it."""
    if isinstance(prompt, str):
        return ("", prompt.strip()) if prompt.strip() else "`prompt` is empty"
    if not isinstance(prompt, list) or not prompt:
        return "`prompt` is missing, or neither text nor a list of chat messages"
    turns = read_turns(prompt)
    if isinstance(turns, str):
        return f"`prompt`: {turns}"
    system = turns.pop(0)[1] if turns[0][0] == "system" else ""
    if [role for role, _ in turns] != ["user"]:
        return "`prompt` must be one user turn (and an optional system turn): multi-turn prompts are not trained"
    return (system, turns[0][1]) if turns[0][1] else "`prompt`'s user turn is empty"


def read_side(value: Any, name: str) -> Side | str:
    """An answer as text or as one assistant message, split into reasoning and answer at </think>."""
    if isinstance(value, list):
        turns = read_turns(value)
        if isinstance(turns, str):
            return f"`{name}`: {turns}"
        if [role for role, _ in turns] != ["assistant"]:
            return f"`{name}` must be one assistant turn"
        value = turns[0][1]
    if not isinstance(value, str):
        return f"`{name}` is neither text nor a list of chat messages"
    cot, response = split_thinking(value)
    if not response:
        return f"`{name}` has an empty answer" + (" (after </think>)" if cot else "")
    return Side(cot, response)


# ------------------------------------------------------------------------------------------------- encoding


def build_preference_examples(recipe, tokenizer, console, rows: PreferenceSet | None = None) -> PreferenceExamples:
    """Rows -> each side rendered and encoded as an SFT completion -> the length policy on whole pairs. `rows`:
    already read (a local file is read before the libraries load); else read here."""
    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.report import show_data

    data, method = recipe.data, recipe.train.method
    rows = rows or load_preference_rows(data, method, recipe.train.seed)
    renderer, layout = make_renderer(tokenizer, data)
    encoder = Encoder(tokenizer, renderer)
    unpaired = method == "kto"

    def encoded(row: PreferenceRow) -> list:
        sides = [(s, good) for s, good in ((row.chosen, True), (row.rejected, False)) if s is not None]
        parts = []
        for side, good in sides:
            example = encoder.encode(row.row(side))
            parts.append((example.input_ids[:example.prompt_length], example.input_ids[example.prompt_length:], good))
        if unpaired:
            return [RatedExample(row.number, prompt, completion, good) for prompt, completion, good in parts]
        (prompt, chosen, _), (_, rejected, _) = parts
        return [PairExample(row.number, prompt, chosen, rejected)]

    # The held-out rows are drawn from those that fit max_length, as SFT draws its eval rows: data.eval_rows then
    # counts rows actually judged, never rows asked for and dropped later.
    done = {r.number: encoded(r) for r in rows.train + rows.held_out}

    def fits(row: PreferenceRow) -> bool:
        return all(longest(e) <= data.max_length for e in done[row.number])

    held_rows = [r for r in rows.held_out if fits(r)]
    spare = [r for r in rows.train if fits(r)][:len(rows.held_out) - len(held_rows)]
    held_rows += spare
    train_rows = [r for r in rows.train if r not in spare]
    rows = dataclasses.replace(rows, train=train_rows + [r for r in rows.held_out if not fits(r)], held_out=held_rows)
    train = [e for r in rows.train for e in done[r.number]]
    held_out = [e for r in rows.held_out for e in done[r.number]]
    kind = "rated answers" if unpaired else "pairs"
    lines = [f"source: {rows.source}  ({rows.paired} pairs" + (f", {rows.rated} rated answers" if rows.rated else "")
             + ")", f"format: {layout}; each side rendered as an SFT completion (one think block, EOS)",
             f"split: {len(rows.train)} train rows, {len(rows.held_out)} held-out rows (judged before and after)"]
    if unpaired and rows.paired:
        lines.append(f"KTO: each pair's chosen side is a good answer, its rejected side a bad one ({len(train)} "
                     "training answers)")
    lines += length_lines(train + held_out)
    train, dropped = apply_pair_length_policy(train, data.max_length, data.over_length)
    held_out, _ = apply_pair_length_policy(held_out, data.max_length, "drop")  # never judged on a cut side
    if dropped:
        done = {"drop": "dropped whole", "truncate": "truncated: each side's end is cut, EOS included"}
        lines.append(f"{len(dropped)} row(s) longer than max_length = {data.max_length}: "
                     f"{done[data.over_length]} (rows {row_list(sorted(dropped), 5)})")
    else:
        lines.append(f"all rows fit max_length = {data.max_length}")
    if unpaired:
        good = sum(e.label for e in train)
        lines.append(f"good / bad answers: {good} / {len(train) - good}")
        if good and len(train) - good and not 1 <= (good * recipe.pref.desirable_weight) / (
                (len(train) - good) * recipe.pref.undesirable_weight) <= 4 / 3:
            lines.append("the good and bad answers are unbalanced for their weights: TRL advises "
                         "pref.desirable_weight x good / (pref.undesirable_weight x bad) between 1 and 4/3")
        if recipe.train.batch_size < 2 and (recipe.pref.loss_type in ("auto", "kto")):
            lines.append("train.batch_size = 1: KTO's KL term pairs each answer with another prompt of its batch, "
                         "so with one row a batch it compares each answer with itself; use 2 or more")
    lines.append(f"training on {len(train)} {kind}")
    show_data(console, lines)
    if not train:
        raise UserError(f"Every training row is longer than data.max_length = {data.max_length} tokens.",
                        hint="Raise data.max_length (the report above gives the lengths).")
    source = [r for r in rows.held_out or rows.train if r.chosen]  # asked with a good answer as the reference
    sample_rows = [r.row(r.chosen) for r in source[:recipe.samples.count]]
    samples_from = "held-out rows (not trained on)" if rows.held_out else \
        "training rows (data.eval_rows = 0, so the model has seen these)"
    if train:
        show_pair(console, train[0], tokenizer)
    return PreferenceExamples(train, held_out, sample_rows, samples_from, lines)


def longest(example) -> int:
    sides = [example.chosen_ids, example.rejected_ids] if isinstance(example, PairExample) else [
        example.completion_ids]
    return len(example.prompt_ids) + max(map(len, sides))


def apply_pair_length_policy(examples: list, max_length: int, policy: str) -> tuple[list, list[int]]:
    """Drop (or refuse, or cut each side of) the rows whose longest side with the prompt is over max_length: a pair
    is kept or dropped whole. Returns (kept, the row numbers over the limit)."""
    over = sorted({e.row for e in examples if longest(e) > max_length})
    if over and policy == "error":
        raise UserError(f"{len(over)} row(s) are longer than data.max_length = {max_length} tokens (rows "
                        f"{row_list(over, 5)}).",
                        hint="Raise data.max_length, or set data.over_length = 'drop' to leave them out.")
    kept = []
    for e in examples:
        if e.row not in over:
            kept.append(e)
        elif policy == "truncate" and len(e.prompt_ids) < max_length:
            room = max_length - len(e.prompt_ids)
            kept.append(PairExample(e.row, e.prompt_ids, e.chosen_ids[:room], e.rejected_ids[:room])
                        if isinstance(e, PairExample) else
                        RatedExample(e.row, e.prompt_ids, e.completion_ids[:room], e.label))
    return kept, over


def length_lines(examples: list) -> list[str]:
    def summary(name: str, values: list[int]) -> str:
        values = sorted(values) or [0]
        at = [values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.9)]
        return f"{name:>10} tokens: p50 {at[0]:>6}  p90 {at[1]:>6}  max {values[-1]:>6}"

    lines = [summary("prompt", [len(e.prompt_ids) for e in examples])]
    if examples and isinstance(examples[0], PairExample):
        lines += [summary("chosen", [len(e.chosen_ids) for e in examples]),
                  summary("rejected", [len(e.rejected_ids) for e in examples])]
    else:
        lines.append(summary("answer", [len(e.completion_ids) for e in examples]))
    return lines


def show_pair(console, example, tokenizer) -> None:
    """The first training row as the model sees it: the prompt dim, the chosen side green, the rejected red."""
    from rich.text import Text

    console.rule(f"[bold]first example[/] (row {example.row}: prompt {len(example.prompt_ids)} tokens)")
    console.print(Text("dim = prompt (no loss), ", style="dim") + Text("green = chosen / good", style="bold green")
                  + Text(", ") + Text("red = rejected / bad", style="bold red"))
    console.print(Text(tokenizer.decode(example.prompt_ids), style="dim"))
    if isinstance(example, PairExample):
        sides = [(example.chosen_ids, "bold green"), (example.rejected_ids, "bold red")]
    else:
        sides = [(example.completion_ids, "bold green" if example.label else "bold red")]
    for ids, style in sides:
        console.print(Text(tokenizer.decode(ids), style=style))


def to_preference_dataset(examples: list):
    """A `datasets.Dataset` of token ids: TRL's own tokenization is skipped (qlora_kit.train.preference)."""
    from datasets import Dataset

    return Dataset.from_list([e.fields() for e in examples])


def write_pair_preview(examples: list, path, tokenizer) -> None:
    """--dry-run of a preference run: each row's prompt and sides as text and ids."""
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            record = {"row": e.row, "prompt": tokenizer.decode(e.prompt_ids), "prompt_ids": e.prompt_ids}
            if isinstance(e, PairExample):
                record.update(chosen=tokenizer.decode(e.chosen_ids), chosen_ids=e.chosen_ids,
                              rejected=tokenizer.decode(e.rejected_ids), rejected_ids=e.rejected_ids)
            else:
                record.update(completion=tokenizer.decode(e.completion_ids), completion_ids=e.completion_ids,
                              label=e.label)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
