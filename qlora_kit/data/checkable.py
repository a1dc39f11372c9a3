"""Rows with an answer a program can check, for GRPO (train.method = "grpo"): every row read and checked before any
weight loads; a bad row stops the run with its line number, as the multiple-choice reader of `qlora-kit eval` does.

Two kinds of rows, in one file or mixed:

    {"question": "Which vitamin deficiency causes scurvy?", "options": ["A", "B12", "C", "D"], "answer": "C"}
    {"question": "A child weighs 12 kg; the dose is 5 mg per kg. How many mg?", "answer": "60"}

- multiple choice (an `options` column): the same rows as `qlora-kit eval --file` (qlora_kit.data.choices), checked
  by the `choice` reward (the letter written after </think>);
- short answer (no options): a reference answer, checked by `numeric` when it is a number ("60", "7.5", "-3",
  "1,200") and by `exact` otherwise (equal after normalisation: case, spaces, punctuation at the ends).

Columns: data.question_column and data.response_column when the data has them (MedQA's `answer_idx`, say), else
`question` and `answer`; `options` for multiple choice. Files: .jsonl/.json/.csv/.parquet or a hub data set, as for SFT.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from qlora_kit.data.choices import Question, question_fields
from qlora_kit.data.rows import read_source_records, row_list, split_rows
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import DataSection

OPTIONS_COLUMN = "options"


@dataclass(frozen=True)
class CheckableRow:
    question: str
    """The question as the model sees it: for multiple choice, the options listed after it and the instruction."""
    answer: str
    """The reference: the right letter (multiple choice) or the short answer as written in the data."""
    kind: str
    """`choice`, `numeric` or `exact`: the reward that checks this row."""
    number: int
    """1-based row number in the source (the line number for .jsonl)."""
    letters: str = ""
    """The option letters of a multiple-choice row ("ABCD"); empty for short answers."""

    def fields(self) -> dict:
        """What the reward functions receive per completion (the data set's columns besides the prompt)."""
        return {"answer": self.answer, "kind": self.kind, "letters": self.letters, "row": self.number}


@dataclass
class CheckableSet:
    train: list[CheckableRow]
    held_out: list[CheckableRow]
    """Rows never trained on (data.eval_rows): the before -> after judgement at the end of the run."""
    source: str
    kinds: dict[str, int]
    """kind -> number of rows."""

    def report(self) -> list[str]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kinds.items() if n)
        return [f"source: {self.source}  ({sum(self.kinds.values())} rows with checkable answers: {kinds})",
                f"split: {len(self.train)} train rows, {len(self.held_out)} held-out rows (judged before and after)"]


def load_checkable(data: DataSection, seed: int) -> CheckableSet:
    """Read, check and split the rows (shuffle with the seed, data.limit, data.eval_rows held out)."""
    records, origin = read_source_records(data)
    if not records:
        raise UserError(f"{origin}: the data set has no rows.", hint="Point data.source at a file with rows.")
    present = set().union(*(r.keys() for r in records[:100]))
    question_column = data.question_column if data.question_column in present else "question"
    answer_column = data.response_column if data.response_column in present else "answer"
    rows, bad = [], {}
    for number, record in enumerate(records, start=1):
        row = checkable_row(record, number, question_column, answer_column)
        if isinstance(row, str):
            bad.setdefault(row, []).append(number)
        else:
            rows.append(row)
    if bad:
        raise UserError(f"{origin}: {sum(map(len, bad.values()))} of the {len(records)} rows cannot be checked.",
                        [f"{problem}: row{'s' if len(numbers) > 1 else ''} {row_list(numbers)}"
                         for problem, numbers in bad.items()],
                        hint=f"GRPO rows need `{question_column}` (text) and `{answer_column}`; multiple-choice rows "
                             "also `options` (a list, or an object keyed A, B, C, ...) with the answer as a letter or "
                             "0-based index. Row numbers count from 1 (the line number in a .jsonl).")
    train, held_out = split_rows(rows, data, seed)  # seeded shuffle, data.limit, data.eval_rows: as SFT splits
    kinds = {kind: sum(r.kind == kind for r in train + held_out) for kind in ("choice", "numeric", "exact")}
    return CheckableSet(train, held_out, origin, kinds)


def checkable_row(record: dict, number: int, question_column: str, answer_column: str) -> CheckableRow | str:
    """One record as a CheckableRow, or what is wrong with it."""
    if record.get(OPTIONS_COLUMN) is not None:
        names = {"question": question_column, "options": OPTIONS_COLUMN, "answer": answer_column}
        fields, problem = question_fields(record, names)
        if problem:
            return problem
        question = Question(*fields, number=number)
        return CheckableRow(question.listing(), question.letters[question.answer], "choice", number,
                            "".join(question.letters))
    text, answer = record.get(question_column), record.get(answer_column)
    if not isinstance(text, str) or not text.strip():
        return f"`{question_column}` is missing or not a non-empty text"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        return f"`{answer_column}` is missing or empty (a short answer, or a number)"
    answer = str(answer).strip()
    return CheckableRow(text.strip(), answer, "numeric" if parse_number(answer) is not None else "exact", number)


# ------------------------------------------------------------------------------------------------ normalisation

NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-−]?\.\d+")


def parse_number(text: str) -> float | None:
    """The text as a number when it is nothing else: "60", "-3", "7.5", "1,200", "60 mg" is not (exact match)."""
    cleaned = text.strip().rstrip(".").replace("−", "-")
    if not NUMBER.fullmatch(cleaned):
        return None
    return _as_float(cleaned)


def last_number(text: str) -> float | None:
    """The last number written in a text ("so the dose is 60 mg." -> 60.0); None when there is none."""
    found = NUMBER.findall(text)
    return _as_float(found[-1]) if found else None


def _as_float(text: str) -> float | None:
    # "1,200" is a thousands separator; "3,5" (a decimal comma) is read as 35, as an English reader would.
    try:
        value = float(text.replace("−", "-").replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_equal(a: float, b: float) -> bool:
    """Equal up to rounding in the last printed digit of floats (relative 1e-6), exact for whole numbers."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def normalize_answer(text: str) -> str:
    """Case, accents' composed forms, inner whitespace and punctuation at the ends do not matter:
    "The answer is: Scurvy." and "scurvy" differ; " Scurvy. " and "scurvy" do not."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.strip(" .,;:!?\"'`*()[]{}")



# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompted:
    row: CheckableRow
    prompt: str
    """The prompt as text, rendered as SFT renders it (data.format: the chat template's generation prompt)."""
    prompt_ids: list[int]
    """Its ids as the SFT encoder builds them: no special tokens added by the tokenizer, exactly one BOS."""


@dataclass
class GrpoExamples:
    train: list[Prompted]
    held_out: list[Prompted]
    judged: list[Prompted]
    """The rows judged before -> after at the end: the held-out ones, else the first training rows."""
    judged_from: str
    data_report: list[str]


def build_grpo_examples(recipe, tokenizer, console, rows: CheckableSet | None = None) -> GrpoExamples:
    """Rows -> prompts -> ids; rows whose prompt leaves no room for grpo.max_completion_length in data.max_length
    are dropped (or refused, data.over_length = "error") and counted. All before any weight loads. `rows`: already
    read (a local file is read before the libraries load); else read here."""
    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.report import show_data
    from qlora_kit.data.rows import Row

    data, room = recipe.data, recipe.data.max_length - recipe.grpo.max_completion_length
    rows = rows or load_checkable(data, recipe.train.seed)
    renderer, layout = make_renderer(tokenizer, data)
    bos = Encoder(tokenizer, renderer).bos_id

    def prompted(row: CheckableRow) -> Prompted:
        prompt = renderer(Row(row.question, "", "", row.number)).prompt
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        return Prompted(row, prompt, [bos, *ids] if bos is not None and ids[:1] != [bos] else ids)

    train, held_out = [prompted(r) for r in rows.train], [prompted(r) for r in rows.held_out]
    too_long = sorted(p.row.number for p in train + held_out if len(p.prompt_ids) > room)
    lines = [*rows.report(), f"format: {layout}"]
    lengths = sorted(len(p.prompt_ids) for p in train + held_out)
    lines.append(f"prompt tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; each completion up to "
                 f"{recipe.grpo.max_completion_length} (grpo.max_completion_length)")
    if too_long:
        if data.over_length == "error":
            raise UserError(f"{len(too_long)} prompt(s) leave no room for a completion of "
                            f"{recipe.grpo.max_completion_length} tokens in data.max_length = {data.max_length} "
                            f"(rows {row_list(too_long, 5)}).",
                            hint="Raise data.max_length, lower grpo.max_completion_length, or set "
                                 "data.over_length = 'drop'.")
        lines.append(f"{len(too_long)} row(s) longer than max_length = {data.max_length} with a full completion: "
                     f"dropped (rows {row_list(too_long, 5)})")
        train = [p for p in train if p.row.number not in too_long]
        held_out = [p for p in held_out if p.row.number not in too_long]
    lines.append(f"training on {len(train)} rows")
    show_data(console, lines)
    if not train:
        raise UserError(f"No training row leaves room for a completion in data.max_length = {data.max_length}.",
                        hint="Raise data.max_length or lower grpo.max_completion_length.")
    if held_out:
        judged, judged_from = held_out, "held-out rows (not trained on)"
    else:
        judged = train[:recipe.samples.count]
        judged_from = "training rows (data.eval_rows = 0, so the model has seen these)"
    return GrpoExamples(train, held_out, judged, judged_from, lines)
