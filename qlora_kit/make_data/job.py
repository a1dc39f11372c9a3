"""A make-data job on disk: the rows it kept, and a log of every decision, so that a kill loses only what was in flight.

    rows.jsonl        the training rows (Question, Complex_CoT, Response + where each came from), appended as kept
    rows.eval.jsonl   the held-out rows (documents or sections no training row comes from)
    rows.job/         settings.json (what the job was started with: a resume must match it), chunks.jsonl (every
                      chunk's text, pages and split: what a reviewer sets a row beside), log.jsonl, summary.json;
                      a dry run with --out writes only preview.jsonl here (its chunks, in chunks.jsonl's form)

Every line is appended and flushed at once: a process killed mid-write leaves at most one cut last line, which is
dropped on reading (and the file is ended cleanly before the next append). The log says, per chunk, the questions
the teacher gave, and per question, whether it was kept or why not. A row is written before its "kept" entry, so a
kill between the two still finds the row by its id: nothing is asked twice, and nothing is kept twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.jsonl import AppendOnly
from qlora_kit.jsonl import read_jsonl as read_lines

PREVIEW_FILE = "preview.jsonl"
"""A dry run's chunks (with --out): the studio shows them before anything is sent."""


def eval_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".eval.jsonl")


def job_folder(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".job")


def chunk_record(chunk) -> dict:
    """A chunk as chunks.jsonl (and a dry run's preview.jsonl) hold it."""
    return {"id": chunk.id, "source": chunk.source, "pages": chunk.pages, "section": chunk.heading,
            "split": chunk.split, "tokens": chunk.tokens, "text": chunk.text}


def write_preview(out: Path, chunks: list) -> Path:
    """A dry run's chunks, as chunks.jsonl would hold them, in NAME.job/preview.jsonl (replaced by each dry run,
    read by nothing of the job): what a page shows before anything is sent (the studio's chunk table)."""
    path = job_folder(out) / PREVIEW_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(chunk_record(c), ensure_ascii=False) + "\n" for c in chunks),
                    encoding="utf-8")
    return path


@dataclass
class State:
    """What earlier runs of the job decided, read back from its files."""

    questions: dict[str, list[str]] = field(default_factory=dict)
    """chunk id -> the questions the teacher gave for it, in the order they were logged."""
    refused_chunks: dict[str, str] = field(default_factory=dict)
    """chunk id -> why its questions reply was refused (after the retry)."""
    decided: dict[str, dict] = field(default_factory=dict)
    """question id -> its log entry ({"kept": true, "score": ...} or {"kept": false, "reason": ...})."""
    rows: dict[str, dict] = field(default_factory=dict)
    """question id -> its row, from both rows files."""


class Job:
    def __init__(self, out: Path, settings: dict, restart: bool = False, overwrite: bool = False):
        self.out, self.eval_out, self.folder = out, eval_path(out), job_folder(out)
        self.settings = settings
        saved = self.folder / "settings.json"
        ours = saved.is_file()
        if restart and ours:
            self.discard()
            ours = False
        theirs = [p for p in (self.out, self.eval_out) if p.exists()]
        if theirs and not ours and not overwrite:
            raise UserError(f"{theirs[0]} exists and is not a make-data job's output.",
                            hint="Choose another --out, or pass --overwrite to replace it.")
        if theirs and not ours:
            for path in theirs:
                path.unlink()
        if ours:
            before = json.loads(saved.read_text(encoding="utf-8"))
            changed = [f"{key}: {before.get(key)!r} then, {value!r} now" for key, value in settings.items()
                       if before.get(key) != value]
            if changed:
                raise UserError(f"{self.out} belongs to a job started with other settings:", changed,
                                hint="Run it with the same settings to continue it, pass --restart to start over "
                                     "(its rows are deleted), or choose another --out.")
        self.resumed = ours
        self.state = self.read_state()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for path in (self.out, self.eval_out):
            path.unlink(missing_ok=True)

    def read_state(self) -> State:
        state = State()
        for entry in read_lines(self.folder / "log.jsonl"):
            if "questions" in entry:
                state.questions.setdefault(entry["chunk"], entry["questions"])
            elif "refused" in entry:
                state.refused_chunks[entry["chunk"]] = entry["refused"]
            elif "question" in entry:
                state.decided[entry["question"]] = entry
        for path in (self.out, self.eval_out):
            for row in read_lines(path):
                if "id" in row:
                    state.rows[row["id"]] = row
        return state

    def start(self, chunks: list) -> None:
        """Open the files for appending (the settings written once, by the run that starts the job), and write the
        chunks (the same every run: they are made from the same documents with the same settings)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            (self.folder / "settings.json").write_text(json.dumps(self.settings, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
        known = {c.get("id") for c in read_lines(self.folder / "chunks.jsonl")}
        with (self.folder / "chunks.jsonl").open("a", encoding="utf-8") as f:  # a trial's chunks, then the rest
            for chunk in chunks:
                if chunk.id not in known:
                    f.write(json.dumps(chunk_record(chunk), ensure_ascii=False) + "\n")
        self.log = AppendOnly(self.folder / "log.jsonl")
        self.writers = {"train": AppendOnly(self.out), "eval": AppendOnly(self.eval_out)}

    def record_questions(self, chunk_id: str, questions: list[str]) -> None:
        self.state.questions[chunk_id] = questions
        self.log.append({"chunk": chunk_id, "questions": questions})

    def record_refused_chunk(self, chunk_id: str, reason: str) -> None:
        self.state.refused_chunks[chunk_id] = reason
        self.log.append({"chunk": chunk_id, "refused": reason})

    def keep(self, row: dict, split: str) -> None:
        self.writers[split].append(row)  # the row first: a kill before the log entry still finds it by its id
        self.state.rows[row["id"]] = row
        self.decide(row["id"], row["chunk"], kept=True, score=row.get("score"))

    def decide(self, question_id: str, chunk_id: str, kept: bool, **details) -> None:
        entry = {"question": question_id, "chunk": chunk_id, "kept": kept, **details}
        self.state.decided[question_id] = entry
        self.log.append(entry)

    def close(self) -> None:
        for writer in (getattr(self, "log", None), *getattr(self, "writers", {}).values()):
            if writer is not None:
                writer.close()
