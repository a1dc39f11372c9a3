"""Read the reasoning rows (local file or hub data set), map columns, check every row, split.

Output is plain Python: a list of `Row` (question, cot, response, and the row's number in the
source so every later message can point at it). Rendering and tokenizing live elsewhere.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UserError, did_you_mean
from qlora_kit.recipe.schema import LOCAL_SUFFIXES, DataSection


@dataclass
class Row:
    question: str
    cot: str
    response: str
    number: int
    """1-based row number in the source (the line number for .jsonl)."""
    system: str = ""
    """The row's own system message (an Alpaca `system` field, a ShareGPT system turn); empty: data.system_prompt."""


@dataclass
class RowSet:
    rows: list[Row]
    source: str
    total: int
    dropped: dict[str, list[int]] = field(default_factory=dict)
    """Reason -> row numbers of rows left out (empty question, empty response, not text)."""
    layout: str = "columns"
    """The data.layout the rows were read with (`auto` resolved): columns, alpaca or sharegpt."""


def load_rows(data: DataSection) -> RowSet:
    records, origin = read_source_records(data)
    if not records:
        raise UserError(f"{origin}: the data set has no rows.", hint="Point data.source at a file with rows.")
    layout = resolve_layout(records, data, origin)
    read_row = {"columns": _columns_row, "alpaca": alpaca_row, "sharegpt": sharegpt_row}[layout]
    rows, dropped = [], {}
    for number, record in enumerate(records, start=1):
        row = read_row(record, data, number)
        if isinstance(row, str):  # what is wrong with it
            dropped.setdefault(row, []).append(number)
            continue
        rows.append(row)
    if not rows:
        raise UserError(f"{origin}: none of the {len(records)} rows is usable.",
                        [f"{reason}: rows {row_list(numbers)}" for reason, numbers in dropped.items()],
                        hint="Check the column mapping (data.question_column, ...) and the file's content.")
    return RowSet(rows, origin, len(records), dropped, layout)


def split_rows(rows: list[Row], data: DataSection, seed: int,
               usable_for_eval: Callable[[Row], bool] | None = None) -> tuple[list[Row], list[Row]]:
    """Shuffle (seeded), apply `limit`, hold out `eval_rows`. Returns (train, eval).

    With `usable_for_eval`, the eval rows are the first rows (in shuffled order) it accepts, e.g. those that fit
    max_length: `eval_rows` then counts rows actually evaluated, never rows asked for and dropped later."""
    rows = list(rows)
    if data.shuffle:
        random.Random(seed).shuffle(rows)
    if data.limit:
        rows = rows[: data.limit]
    if data.eval_rows >= len(rows):
        raise UserError(f"data.eval_rows = {data.eval_rows} leaves no rows to train on ({len(rows)} usable rows).",
                        hint="Lower data.eval_rows or raise data.limit.")
    usable = usable_for_eval or (lambda row: True)
    held_out: set[int] = set()
    for row in rows:
        if len(held_out) == data.eval_rows:
            break
        if usable(row):
            held_out.add(row.number)
    return [r for r in rows if r.number not in held_out], [r for r in rows if r.number in held_out]


def is_local_source(data: DataSection) -> bool:
    """data.source names a file (or what should be one), not a hub data set: a data file's suffix, something on disk,
    or a path that says it is one (absolute, ./, ~), which is never sent to the hub as an id, whatever its suffix."""
    path = Path(data.source).expanduser()
    return path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or data.source.startswith((".", "/", "~"))


def read_source_records(data: DataSection) -> tuple[list[dict[str, Any]], str]:
    """data.source's records as dicts (a local file or a hub data set), and where they came from for messages. Shared
    by the SFT rows here and GRPO's checkable rows."""
    path = Path(data.source).expanduser()
    if is_local_source(data):
        if not path.is_file():
            raise file_not_found(path)
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"{path}: unsupported file type `{path.suffix}`.",
                            hint=f"Use one of {', '.join(LOCAL_SUFFIXES)}.")
        try:
            return reader(path), str(path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}).",
                            hint="Re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`).") from None
    return _read_hub(data), f"{data.source} [{data.config}/{data.split}]"


def file_not_found(path: Path) -> UserError:
    """Where it looked (relative names are read from the current folder, once the recipe's folder had none), and
    the close file beside it: `rows.json` for `rows.jsonl`, `data/rows.jsnl` for `data/rows.jsonl`."""
    looked = path if path.is_absolute() else Path.cwd() / path
    folder = looked.parent
    close = did_you_mean(path.name, [entry.name for entry in folder.iterdir()],
                         prefix="" if path.parent == Path(".") else f"{path.parent}/") if folder.is_dir() else ""
    where = "" if path.is_absolute() else f" (looked for {looked})"
    return UserError(f"Data file not found: {path}{where}{close}",
                     hint="Set data.source to an existing .jsonl/.json/.csv/.parquet file (a relative path starts "
                          "from the recipe's folder) or a hub data set id.")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    # utf-8-sig: files saved by Windows editors start with a byte-order mark, which is not part of the JSON.
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                # strict=False: a raw tab or control character inside a string is taken as text, not refused.
                record = json.loads(line, strict=False)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {line_number}: not valid JSON ({e.msg.removesuffix(' at')}, "
                                f"column {e.colno}).",
                                hint="Each line must be one JSON object; fix or delete that line.") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"), strict=False)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg.removesuffix(' at')}).") \
            from None
    if isinstance(content, dict) and len(content) == 1 and isinstance(next(iter(content.values())), list):
        content = next(iter(content.values()))  # {"data": [...]} layouts
    if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
        raise UserError(f"{path}: expected a JSON list of objects (one per row).",
                        hint="Or use .jsonl: one JSON object per line.")
    return content


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # a BOM would otherwise stick to the first header
        return list(csv.DictReader(f))


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_hub(data: DataSection) -> list[dict]:
    if data.hub == "modelscope":
        from qlora_kit.data.hub import read_modelscope_rows

        return read_modelscope_rows(data.source, data.config, data.split)
    import datasets

    try:
        dataset = datasets.load_dataset(data.source, data.config or None, split=data.split)
    except Exception as e:  # the hub client raises many types; the user needs the message, not the stack
        raise UserError(f"Could not load hub data set `{data.source}` (config `{data.config}`, split "
                        f"`{data.split}`): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="Check the id, config and your connection, or download it and point data.source "
                             "at the local .jsonl/.parquet file.") from None
    return dataset.to_list()


ALPACA_COLUMNS = ("instruction", "output")
SHAREGPT_COLUMNS = ("conversations", "messages")


def resolve_layout(records: list[dict], data: DataSection, origin: str) -> str:
    """data.layout, with `auto` decided from the columns of the first rows; checks the columns the layout needs."""
    present = set().union(*(r.keys() for r in records[:100]))
    layout = data.layout
    if layout == "auto":
        if data.question_column in present:
            layout = "columns"
        elif all(c in present for c in ALPACA_COLUMNS):
            layout = "alpaca"
        elif any(c in present for c in SHAREGPT_COLUMNS):
            layout = "sharegpt"
        else:
            layout = "columns"  # its error names the missing columns and the other layouts
    if layout == "alpaca":
        missing = [c for c in ALPACA_COLUMNS if c not in present]
        if missing:
            raise UserError(f"{origin}: data.layout = 'alpaca' needs the column(s) {', '.join(missing)}.",
                            hint=f"The data has columns: {', '.join(sorted(present))}.")
    elif layout == "sharegpt":
        if not any(c in present for c in SHAREGPT_COLUMNS):
            raise UserError(f"{origin}: data.layout = 'sharegpt' needs a `conversations` or `messages` column.",
                            hint=f"The data has columns: {', '.join(sorted(present))}.")
    else:
        _check_columns(present, data, origin)
    return layout


def _columns_row(record: dict, data: DataSection, number: int) -> Row | str:
    problem = _row_problem(record, data)
    if problem:
        return problem
    cot = record.get(data.cot_column, "") if data.cot_column else ""
    return Row(record[data.question_column].strip(), (cot or "").strip(), record[data.response_column].strip(),
               number)


def alpaca_row(record: dict, data: DataSection, number: int) -> Row | str:
    """Alpaca: the instruction, then the input (when there is one) after a blank line, as Alpaca's own prompt
    puts them; `output` is the answer. A `history` of earlier turns would need multi-turn training: refused."""
    for column in ("instruction", "input", "output", "system"):
        if record.get(column) is not None and not isinstance(record[column], str):
            return f"`{column}` is not text"
    if record.get("history"):
        return "has a `history` of earlier turns (multi-turn rows are not trained: split them into single turns)"
    instruction, extra = (record.get("instruction") or "").strip(), (record.get("input") or "").strip()
    question = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    if not question:
        return "empty `instruction` and `input`"
    return _answer_row(question, record.get("output") or "", (record.get("system") or "").strip(), number)


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
"""ShareGPT's `from` names and the OpenAI-style `role` names, to one vocabulary."""


def sharegpt_row(record: dict, data: DataSection, number: int) -> Row | str:
    """ShareGPT (`conversations`, from/value) or OpenAI messages (`messages`, role/content): an optional system turn,
    one user turn, one assistant turn. More turns would need loss on every assistant turn, which qlora_kit does not
    do: such rows are refused, with their numbers."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        return "no `conversations` / `messages` list"
    parsed = read_turns(turns)
    if isinstance(parsed, str):
        return parsed
    system = parsed.pop(0)[1] if parsed[0][0] == "system" else ""
    roles = [role for role, _ in parsed]
    if roles.count("user") > 1 or roles.count("assistant") > 1:
        return "multi-turn conversation (more than one user or assistant turn: split it into single turns)"
    if roles != ["user", "assistant"]:
        return "not one user turn followed by one assistant turn"
    if not parsed[0][1]:
        return "empty user turn"
    return _answer_row(parsed[0][1], parsed[1][1], system, number)


def read_turns(turns: list) -> list[tuple[str, str]] | str:
    """Chat turns (ShareGPT's from/value or OpenAI's role/content) as (role, text) in one vocabulary, or what is
    wrong with them. Shared by the ShareGPT rows here and the preference rows' chat format."""
    parsed = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "a turn is not an object"
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        if role is None:
            return f"a turn's role `{turn.get('from', turn.get('role'))}` is not user, assistant or system"
        if not isinstance(text, str):
            return "a turn's text is not a string"
        parsed.append((role, text.strip()))
    return parsed


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(answer: str) -> tuple[str, str]:
    """`<think>reasoning</think>answer` (the opener may be missing, as R1 writes it after a template that opened the
    block) -> (reasoning, answer); an answer without </think> has no reasoning."""
    if THINK_CLOSE not in answer:
        return "", answer.strip()
    reasoning, _, rest = answer.partition(THINK_CLOSE)
    return reasoning.strip().removeprefix(THINK_OPEN).strip(), rest.strip()


def _answer_row(question: str, answer: str, system: str, number: int) -> Row | str:
    cot, response = split_thinking(answer)
    if not response:
        return "empty answer (after </think>)" if cot else "empty answer"
    return Row(question, cot, response, number, system)


def _check_columns(present: set, data: DataSection, origin: str) -> None:
    wanted = {"data.question_column": data.question_column, "data.response_column": data.response_column}
    if data.cot_column:
        wanted["data.cot_column"] = data.cot_column
    missing = [f"column `{col}` ({key}) is not in the data" for key, col in wanted.items() if col not in present]
    if missing:
        raise UserError(f"{origin}: {len(missing)} column(s) missing.", missing,
                        hint=f"The data has columns: {', '.join(sorted(present))}. "
                             "Map yours with data.question_column / data.cot_column / data.response_column, or set "
                             "data.layout = 'alpaca' (instruction/input/output) or 'sharegpt' (conversations or "
                             "messages).")


def _row_problem(record: dict, data: DataSection) -> str:
    for column, required in ((data.question_column, True), (data.response_column, True),
                             (data.cot_column, False)):
        if not column:
            continue
        value = record.get(column)
        if value is None:
            if required:
                return f"missing `{column}`"
            continue
        if not isinstance(value, str):
            return f"`{column}` is not text"
        if required and not value.strip():
            return f"empty `{column}`"
    return ""


def row_list(numbers: list[int], n: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:n]))
    return shown + (f" ... ({len(numbers)} in all)" if len(numbers) > n else "")

