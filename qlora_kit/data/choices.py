"""Multiple-choice rows: read a .jsonl, map its columns, check every row, say which rows are wrong.

Read by `qlora-kit eval` (your own questions, scored base vs fine-tuned) and by GRPO training (rows whose right
letter is checked by a reward): it lives here, in data/, so that both stages can import it.

One JSON object per line, e.g.

    {"question": "Which vitamin deficiency causes scurvy?", "options": ["A", "B12", "C", "D"], "answer": "C"}
    {"question": "...", "options": {"A": "...", "B": "...", "C": "...", "D": "..."}, "answer": 1}

`options` is a list or an object keyed by letter (A, B, C, ... in order); `answer` is a letter or a 0-based index.
Questions may have 2 to 10 options, not necessarily the same number. A column map renames the three columns.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.data.rows import row_list
from qlora_kit.errors import UserError

LETTERS = string.ascii_uppercase[:10]
COLUMNS = ("question", "options", "answer")


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[str, ...]
    answer: int
    """0-based index of the right option."""
    number: int
    """1-based line number in the file."""

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.options)])

    def prompt(self) -> str:
        """The question as lm-evaluation-harness's MedQA / MMLU tasks put it: the model then writes one letter."""
        listed = "".join(f"{letter}. {option}\n" for letter, option in zip(self.letters, self.options, strict=True))
        return f"Question: {self.text}\n{listed}Answer:"

    def listing(self) -> str:
        """The question for a model that reasons first (eval --generate, GRPO): the options, then what to write."""
        return self.prompt().removesuffix("Answer:") + REASON_INSTRUCTION


REASON_INSTRUCTION = "Think it through, then answer with the letter of the right option."
"""What a reasoning model is asked after the options (the same words as lm-eval's generation task in eval/)."""


def chosen_letter(answer: str, letters: list[str] | tuple[str, ...]) -> str | None:
    """The option letter an answer names: "C", "(C)", "C. Vitamin C", "The answer is C", "**C**"; None if none.
    (eval/harness.py reads generated replies with the same patterns.)"""
    allowed = "".join(letters)
    patterns = (rf"answer\s*(?:is|:)?\s*[*(\[]*([{allowed}])\b", rf"^[\s*(\[]*([{allowed}])(?:[\s).:\]*]|$)",
                rf"\(([{allowed}])\)", rf"\b([{allowed}])\b")
    for pattern in patterns:
        match = re.search(pattern, answer, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if match:
            return match.group(1).upper()
    return None


def parse_column_map(text: str) -> dict[str, str]:
    """`question=Frage,answer=label` -> {"question": "Frage", "answer": "label"}; unknown names are refused."""
    mapping, problems = {}, []
    for item in filter(None, (part.strip() for part in text.split(","))):
        ours, sep, theirs = item.partition("=")
        if not sep or not theirs.strip() or ours.strip() not in COLUMNS:
            problems.append(f"`{item}`: expected one of {', '.join(c + '=YOUR_COLUMN' for c in COLUMNS)}")
            continue
        mapping[ours.strip()] = theirs.strip()
    if problems:
        raise UserError("--columns: cannot read the column map.", problems,
                        hint="e.g. --columns question=stem,options=choices,answer=label")
    return mapping


def load_questions(path: str | Path, columns: dict[str, str] | None = None) -> list[Question]:
    """Every row checked; one error lists every bad row (with its line number), as qlora_kit.data.rows does."""
    path = Path(path).expanduser()
    names = {c: (columns or {}).get(c, c) for c in COLUMNS}
    if not path.is_file():
        raise UserError(f"Questions file not found: {path}", hint="Pass a .jsonl file of question/options/answer.")
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: questions must be a .jsonl file (one JSON object per line).",
                        hint="Convert it, e.g. with pandas: df.to_json(path, orient='records', lines=True).")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}).", hint="Re-save the file as UTF-8.") from None
    questions, bad = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question, problem = read_question(line, names)
        if problem:
            bad.setdefault(problem, []).append(number)
        else:
            questions.append(Question(*question, number=number))
    if bad:
        raise UserError(f"{path}: {sum(map(len, bad.values()))} of the rows cannot be scored.",
                        [f"{problem}: line{'s' if len(numbers) > 1 else ''} {row_list(numbers)}"
                         for problem, numbers in bad.items()],
                        hint="Each line needs a question (text), options (a list, or an object keyed A, B, C, ...) "
                             "and answer (a letter or a 0-based index); map other column names with --columns.")
    if not questions:
        raise UserError(f"{path}: the file has no questions.", hint="One JSON object per line.")
    return questions


def read_question(line: str, names: dict[str, str]) -> tuple[tuple | None, str]:
    try:
        record = json.loads(line, strict=False)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return question_fields(record, names)


def question_fields(record: dict, names: dict[str, str]) -> tuple[tuple | None, str]:
    """(text, options, answer index) of one record, or (None, what is wrong with it)."""
    missing = [f"`{names[c]}`" for c in COLUMNS if record.get(names[c]) is None]
    if missing:
        return None, f"missing {', '.join(missing)}"
    text = record[names["question"]]
    if not isinstance(text, str) or not text.strip():
        return None, f"`{names['question']}` is not a non-empty text"
    options, problem = read_options(record[names["options"]], names["options"])
    if problem:
        return None, problem
    answer, problem = read_answer(record[names["answer"]], len(options), names["answer"])
    if problem:
        return None, problem
    return (text.strip(), options, answer), ""


def read_options(value, column: str) -> tuple[tuple[str, ...], str]:
    if isinstance(value, dict):
        keys = [str(k).strip().upper() for k in value]
        if keys != list(LETTERS[: len(keys)]):
            return (), f"`{column}` keys must be A, B, C, ... in order"
        value = list(value.values())
    if not isinstance(value, list):
        return (), f"`{column}` must be a list or an object keyed A, B, C, ..."
    if not 2 <= len(value) <= len(LETTERS):
        return (), f"`{column}` must have 2 to {len(LETTERS)} options"
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in value):
        return (), f"`{column}` has an empty or non-text option"
    return tuple(str(v).strip() for v in value), ""


def read_answer(value, count: int, column: str) -> tuple[int, str]:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.strip().upper().strip("().") in LETTERS:
        index = LETTERS.index(value.strip().upper().strip("()."))
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        return -1, f"`{column}` must be a letter (A, B, ...) or a 0-based index"
    if not 0 <= index < count:
        return -1, f"`{column}` points past the options"
    return index, ""
