"""A person's review of a make-data job: each row beside the chunk it came from, accepted, edited or dropped.

    accept   the row marked "reviewed": "accepted" (an edited row stays "edited")
    edit     its Question / Complex_CoT / Response replaced (the same id), marked "reviewed": "edited"; the teacher's
             text goes into the log, so nothing the teacher wrote is lost
    drop     the row removed from its file, and {"question": id, "chunk": ..., "kept": false, "reason": "dropped in
             review"} logged: a resumed job never asks that question again, and its summary counts the row under
             that reason

Only for a job no make-data process is writing: its files are append-only while it runs, and a rewrite would lose
what it appends meanwhile (the studio refuses review while its child runs). Each change is logged first, then the
rows file is rewritten through a temporary file and a rename: a kill leaves the old file or the new one, never half of
one, and a kill between the two leaves the row as it was (the job reads the row, not the log, for what it keeps). A
line cut short by a kill of the job (not JSON) is left out of the rewritten file: it was never kept.
summary.json is the job's last run's; the next run of the command counts the review in it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.make_data.job import AppendOnly, eval_path, job_folder, read_lines

DROPPED = "dropped in review"
EDITED_FIELDS = ("Question", "Complex_CoT", "Response")


@dataclass(frozen=True)
class Reviewed:
    row: dict
    split: str
    """"train" (rows.jsonl) or "eval" (rows.eval.jsonl)."""
    chunk: dict | None
    """The chunk it came from, as rows.job/chunks.jsonl holds it (None when the job's folder lacks it)."""


def rows_file(out: Path, split: str) -> Path:
    return eval_path(out) if split == "eval" else out


def chunks_of(out: Path) -> dict[str, dict]:
    """Chunk id -> its record (id, source, pages, section, split, tokens, text)."""
    return {c["id"]: c for c in read_lines(job_folder(out) / "chunks.jsonl") if "id" in c}


def rows(out: Path) -> list[Reviewed]:
    """Every row of the job, the training rows first, each with its chunk."""
    chunks = chunks_of(out)
    return [Reviewed(row, split, chunks.get(row.get("chunk", "")))
            for split in ("train", "eval") for row in read_lines(rows_file(out, split)) if "id" in row]


def find(out: Path, row_id: str) -> Reviewed:
    for found in rows(out):
        if found.row["id"] == row_id:
            return found
    raise UserError(f"No row {row_id} in {out} or {eval_path(out)}.",
                    hint="It may have been dropped already: reload the rows.")


def accept(out: Path, row_id: str) -> dict:
    """The row marked accepted (an edited row stays marked edited: the person's text is what was accepted)."""
    found = find(out, row_id)
    row = {**found.row, "reviewed": "edited" if found.row.get("reviewed") == "edited" else "accepted"}
    log(out, {"question": row_id, "chunk": row.get("chunk", ""), "kept": True, "review": "accepted"})
    rewrite(rows_file(out, found.split), row_id, row)
    return row


def edit(out: Path, row_id: str, question: str, cot: str, response: str) -> dict:
    """The row with a person's text (the same id: the job knows it by the question the teacher asked)."""
    new = {"Question": question.strip(), "Complex_CoT": cot.strip(), "Response": response.strip()}
    empty = [name for name, value in new.items() if not value]
    if empty:
        raise UserError(f"Row {row_id}: {', '.join(empty)} would be empty.",
                        hint="Write it, or drop the row instead (training needs a question, its reasoning and an "
                             "answer).")
    tags = [name for name in ("Question", "Response") if "<think>" in new[name] or "</think>" in new[name]]
    if tags:
        raise UserError(f"Row {row_id}: {', '.join(tags)} holds a <think> tag.",
                        hint="Put the reasoning in Complex_CoT, without the tags: training adds them.")
    found = find(out, row_id)
    before = {name: found.row.get(name, "") for name in EDITED_FIELDS}
    row = {**found.row, **new, "reviewed": "edited"}
    log(out, {"question": row_id, "chunk": row.get("chunk", ""), "kept": True, "review": "edited", "before": before})
    rewrite(rows_file(out, found.split), row_id, row)
    return row


def drop(out: Path, row_id: str) -> None:
    found = find(out, row_id)
    log(out, {"question": row_id, "chunk": found.row.get("chunk", ""), "kept": False, "reason": DROPPED})
    rewrite(rows_file(out, found.split), row_id, None)


def log(out: Path, entry: dict) -> None:
    writer = AppendOnly(job_folder(out) / "log.jsonl")
    try:
        writer.append(entry)
    finally:
        writer.close()


def rewrite(path: Path, row_id: str, row: dict | None) -> None:
    """The file with the row `row_id` replaced by `row` (None: removed), the other lines as they were."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: never kept
        if isinstance(record, dict) and record.get("id") == row_id:
            if row is not None:
                lines.append(json.dumps(row, ensure_ascii=False))
            continue
        lines.append(line)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def counts(out: Path) -> dict[str, int]:
    """Rows left, and what the review did so far (from the rows and the log)."""
    left = rows(out)
    dropped = {e["question"] for e in read_lines(job_folder(out) / "log.jsonl")
               if e.get("reason") == DROPPED and "question" in e}
    return {"rows": len(left), "accepted": sum(r.row.get("reviewed") == "accepted" for r in left),
            "edited": sum(r.row.get("reviewed") == "edited" for r in left),
            "dropped": len(dropped - {r.row["id"] for r in left})}
