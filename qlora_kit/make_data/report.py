"""What make-data tells the user: the plan before the first request, progress with the measured rate and ETA, and the
summary at the end (rows kept, refused by reason, per document, the rows' lengths against data.max_length).

Token counts are the student's tokenizer's: the teacher's differs (by tens of per cent between model families), so
the plan says "about". The summary is computed from the job's files, so a resumed job reports all of its runs.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from qlora_kit.make_data.chunks import Chunk
from qlora_kit.make_data.generate import Asking, Outcome, question_id
from qlora_kit.make_data.job import Job


def plan_lines(chunks: list[Chunk], asking: Asking, template_tokens: dict[str, int]) -> list[str]:
    """Chunks, requests and tokens to send: the job's size before any request."""
    n = asking.questions_per_chunk
    held_out = sum(1 for c in chunks if c.split == "eval")
    sizes = sorted(c.tokens for c in chunks)
    send = sum(template_tokens["questions"] + c.tokens + n * (template_tokens["answer"] + c.tokens) +
               n * (template_tokens["judge"] + c.tokens + asking.answer_tokens // 4) for c in chunks)
    receive = len(chunks) * (asking.question_tokens + n * (asking.answer_tokens + asking.judge_tokens))
    return [f"chunks: {len(chunks)} ({len(chunks) - held_out} train, {held_out} held out), "
            f"{sizes[len(sizes) // 2]} tokens median, {sizes[-1]} max",
            f"requests: about {len(chunks) * (1 + 2 * n)} ({n} questions per chunk, an answer and a judgement for "
            f"each; a reply not in the asked form is asked once more)",
            f"tokens: about {send:,} to send, at most {receive:,} to receive (counted with the student's tokenizer)"]


class Progress:
    """A rich progress bar on a terminal (chunks and questions, with the ETA); a line every half minute elsewhere."""

    def __init__(self, console: Console, chunks_left: int, questions_left: int, per_chunk: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console, self.per_chunk = console, per_chunk
        self.kept = self.refused = self.failures = 0
        self.started = self.last_line = time.monotonic()
        self.chunks_left, self.questions_known = chunks_left, questions_left
        self.first_rate_shown = False
        self.bar = None
        if console.is_terminal:
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                    TextColumn("{task.fields[note]}"), console=console)
            self.chunk_task = self.bar.add_task("chunks   ", total=chunks_left, note="")
            self.question_task = self.bar.add_task("questions", total=self.questions_total(), note="")
            self.bar.start()

    def questions_total(self) -> int:
        return self.questions_known + self.chunks_left * self.per_chunk

    def chunk_done(self, questions: int) -> None:
        self.chunks_left -= 1
        self.questions_known += questions
        if self.bar:
            self.bar.advance(self.chunk_task)
            self.bar.update(self.question_task, total=self.questions_total())
        self.tick()

    def question_done(self, kept: bool) -> None:
        self.kept += kept
        self.refused += not kept
        if self.bar:
            self.bar.advance(self.question_task)
            self.bar.update(self.question_task, note=f"{self.kept} kept, {self.refused} refused")
        self.tick()

    def failed(self, kind: str) -> None:
        self.failures += 1
        self.tick()

    def tick(self) -> None:
        done = self.kept + self.refused
        elapsed = time.monotonic() - self.started
        if done and not self.first_rate_shown:  # the first measured rate: what the whole job will take
            self.first_rate_shown = True
            self.say(f"first rows after {elapsed:.0f} s: about {self.eta(done, elapsed)} for the rest")
        elif not self.bar and time.monotonic() - self.last_line >= 30:
            self.say(f"{done} questions answered ({self.kept} kept, {self.refused} refused), "
                     f"{self.chunks_left} chunks to ask, {self.failures} failed requests, "
                     f"{60 * self.kept / max(elapsed, 1e-9):.1f} rows/min, eta {self.eta(done, elapsed)}")

    def eta(self, done: int, elapsed: float) -> str:
        left = max(self.questions_total() - done, 0)
        seconds = elapsed / max(done, 1) * left
        return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"

    def say(self, text: str) -> None:
        self.last_line = time.monotonic()
        (self.bar.console if self.bar else self.console).print(Text(text, style="dim"))

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def summary(job: Job, chunks: list[Chunk], outcome: Outcome) -> dict:
    """The job over all of its runs: rows kept, refused by reason, per document; this run's requests."""
    state = job.state
    by_source: dict[str, Counter] = defaultdict(Counter)
    for chunk in chunks:
        by_source[chunk.source]["chunks"] += 1
    source_of = {chunk.id: chunk.source for chunk in chunks}
    refused = Counter()
    for chunk_id, reason in state.refused_chunks.items():
        refused[reason] += 1
        by_source[source_of.get(chunk_id, "?")]["refused"] += 1
    for qid, entry in state.decided.items():
        if not entry["kept"] and qid not in state.rows:
            refused[entry["reason"]] += 1
            by_source[source_of.get(entry["chunk"], "?")]["refused"] += 1
    split_of = {chunk.id: chunk.split for chunk in chunks}
    splits = Counter(split_of.get(row["chunk"], "train") for row in state.rows.values())
    for row in state.rows.values():
        by_source[row["source"]]["kept"] += 1
    asked = set(state.questions) | set(state.refused_chunks)
    ids = [question_id(chunk_id, n, q) for chunk_id, questions in state.questions.items()
           for n, q in enumerate(questions)]
    unanswered = sum(1 for qid in ids if qid not in state.decided and qid not in state.rows)
    return {"rows_train": splits["train"], "rows_eval": splits["eval"], "refused": dict(refused.most_common()),
            "chunks": len(chunks), "chunks_not_asked": sum(1 for c in chunks if c.id not in asked),
            "questions_not_answered": unanswered, "failed_requests": dict(outcome.failed),
            "requests": outcome.requests, "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens, "seconds": round(outcome.seconds, 1),
            "per_document": {source: dict(counts) for source, counts in sorted(by_source.items())},
            "train_file": str(job.out), "eval_file": str(job.eval_out)}


def write_summary(job: Job, content: dict) -> Path:
    path = job.folder / "summary.json"
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def show_summary(console: Console, content: dict) -> None:
    console.rule("[bold]rows")
    console.print(Text(f"kept {content['rows_train'] + content['rows_eval']} rows: {content['rows_train']} in "
                       f"{content['train_file']}, {content['rows_eval']} held out in {content['eval_file']}",
                       style="bold"))
    if content["refused"]:
        console.print("refused, by reason:")
        for reason, count in content["refused"].items():
            console.print(Text(f"  {count:>5}  {reason}"))
    table = Table(title="per document", title_justify="left")
    for column in ("document", "chunks", "kept", "refused"):
        table.add_column(column, justify="left" if column == "document" else "right")
    for source, counts in content["per_document"].items():
        table.add_row(source, *(str(counts.get(key, 0)) for key in ("chunks", "kept", "refused")))
    console.print(table)
    console.print(f"this run: {content['requests']} requests, {content['prompt_tokens']:,} tokens sent, "
                  f"{content['completion_tokens']:,} received, {content['seconds']:.0f} s")


def length_lines(rows: list[dict], tokenizer, max_length: int) -> list[str]:
    """The kept rows as training will see them (the student's chat template and completion), against max_length."""
    from qlora_kit.data.encode import Encoder, apply_length_policy
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import Row
    from qlora_kit.recipe.schema import DataSection

    if not rows:
        return []
    renderer, _ = make_renderer(tokenizer, DataSection(max_length=max_length))
    encoder = Encoder(tokenizer, renderer)
    examples = [encoder.encode(Row(r["Question"], r["Complex_CoT"], r["Response"], n))
                for n, r in enumerate(rows, start=1)]
    _, lengths = apply_length_policy(examples, max_length, "drop")
    return lengths.lines()
