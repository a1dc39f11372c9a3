"""The Make data screen's plain functions: the `qlora-kit make-data` command the fields make, and what the page shows
from the files the command writes (the dry run's chunks, the job's progress and summary, each row beside its chunk),
with a failed command's message placed under the field it concerns. No Gradio here, so tests read them directly.

    OUT.jsonl, OUT.eval.jsonl             the rows (read; rewritten only by make_data.review, while nothing runs)
    OUT.job/preview.jsonl                 the dry run's chunks
    OUT.job/chunks.jsonl, log.jsonl       the job's chunks and decisions, as they grow
    OUT.job/summary.json                  the job's figures, after each run of the command
    OUT.job/studio.log, .pid, .exit       what the studio adds: the child's output, its process id, its exit status
    OUT.job/studio.command.json           the command the studio ran (its arguments, never the key): Resume runs it
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import EXIT_INTERRUPTED, UserError
from qlora_kit.make_data.documents import KINDS
from qlora_kit.make_data.job import PREVIEW_FILE, eval_path, job_folder, read_lines
from qlora_kit.make_data.review import Reviewed
from qlora_kit.studio import runs
from qlora_kit.studio.i18n import t
from qlora_kit.studio.workspace import Workspace

COMMAND_FILE = "studio.command.json"
STUDENT_RECIPE = "studio.student.toml"
KEY_VARIABLE = "OPENAI_API_KEY"
"""The one place make-data reads a key from (make_data/teacher.py)."""
SKIPPED_FOLDERS = {"runs", "node_modules", "__pycache__"}
LISTED_AT_MOST = 500

# The screen's fields an error can be said under: documents, out, url, model, key, student, questions, lang,
# max_chunks, context, concurrency. A problem of the CLI's check names its flag first.
FLAG_FIELDS = {"--out": "out", "--base-url": "url", "--model": "model", "--questions-per-chunk": "questions",
               "--max-chunks": "max_chunks", "--context": "context", "--concurrency": "concurrency",
               "--tokenizer": "student", "--recipe": "student", "--lang": "lang"}


@dataclass
class Request:
    """The screen's fields, as typed (the key is not one of them: it goes to the environment only)."""

    documents: list[str]
    out: str
    url: str = ""
    model: str = ""
    student: str = ""
    max_length: int | None = None
    questions: int | None = 3
    lang: str = "auto"
    max_chunks: int | None = 0
    context: int | None = None
    concurrency: int | None = None


class FieldErrors(Exception):
    """Problems found before any command runs, by field."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


def list_documents(root: Path) -> list[str]:
    """Documents make-data reads, anywhere in the workspace (relative paths, sorted); hidden folders, run
    directories and make-data's own job folders left out."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS
                               and not d.endswith(".job"))
        for name in sorted(files):
            if Path(name).suffix.lower() in KINDS and not name.startswith("."):
                found.append(str((Path(folder) / name).relative_to(root)))
                if len(found) >= LISTED_AT_MOST:
                    return found
    return found


def list_jobs(root: Path) -> list[str]:
    """The rows files of make-data jobs in the workspace (NAME.jsonl beside its NAME.job/), relative paths."""
    jobs = []
    for folder, subfolders, _ in os.walk(root):
        for name in list(subfolders):
            if name.endswith(".job"):
                jobs.append(str((Path(folder) / name.removesuffix(".job")).relative_to(root)) + ".jsonl")
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS
                         and not d.endswith(".job")]
    return sorted(jobs)


def rows_path(ws: Workspace, out: str) -> Path:
    try:
        return ws.resolve(out or "", "rows file")
    except UserError as error:
        raise FieldErrors({"out": error.render()}) from None


def command_args(ws: Workspace, request: Request, dry_run: bool = False) -> list[str]:
    """`make-data ...` for the fields: every path confined to the workspace first (FieldErrors when one leaves it).
    What the CLI checks itself (a missing URL, a bad number) it is left to say, and its message is placed under the
    field (error_fields)."""
    errors: dict[str, str] = {}
    documents = []
    for name in request.documents:
        try:
            documents.append(str(ws.resolve(name, "document")))
        except UserError as error:
            errors["documents"] = error.render()
    try:
        out = rows_path(ws, request.out)
    except FieldErrors as problem:
        errors.update(problem.errors)
    args = ["make-data", *documents, "--out", str(out) if "out" not in errors else ""]
    if request.url.strip():
        args += ["--base-url", request.url.strip()]
    if request.model.strip():
        args += ["--model", request.model.strip()]
    if request.student.strip():
        try:
            student = ws.reference(request.student, "student model")
        except UserError as error:
            errors["student"] = error.render()
        else:
            if not student.lower().endswith(".gguf"):
                args += ["--tokenizer", student]
            elif "out" not in errors:
                # A GGUF's tokenizer is read through a recipe (the CLI writes it out once into its cache).
                recipe = job_folder(out) / STUDENT_RECIPE
                recipe.parent.mkdir(parents=True, exist_ok=True)
                recipe.write_text(f"[model]\nname = {json.dumps(student)}\n", encoding="utf-8")
                args += ["--recipe", str(recipe)]
    if errors:
        raise FieldErrors(errors)
    for flag, value in (("--max-length", request.max_length), ("--questions-per-chunk", request.questions),
                        ("--max-chunks", request.max_chunks), ("--context", request.context),
                        ("--concurrency", request.concurrency)):
        # An empty number box comes as 0 (or None): the CLI's default then, except for --max-chunks, where 0 is all.
        if value not in (None, "") and (value or flag == "--max-chunks"):
            args += [flag, str(int(value))]
    if request.lang in ("auto", "en", "zh"):
        args += ["--lang", request.lang]
    return [*args, "--dry-run"] if dry_run else args


def key_environment(key: str | None) -> dict[str, str]:
    """The key typed into the page, as the child's OPENAI_API_KEY (empty: the studio's own environment decides)."""
    key = (key or "").strip()
    return {KEY_VARIABLE: key} if key else {}


def following(out: Path, request: Request) -> dict:
    """What the screen's timer follows: the job's rows file and the fields that started it (for its errors)."""
    return {"out": str(out), "request": dataclasses.asdict(request)}


def save_command(out: Path, args: list[str]) -> None:
    folder = job_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMMAND_FILE).write_text(json.dumps({"args": args}, ensure_ascii=False, indent=1) + "\n",
                                       encoding="utf-8")


def saved_command(out: Path) -> list[str]:
    try:
        return list(json.loads((job_folder(out) / COMMAND_FILE).read_text(encoding="utf-8"))["args"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ----------------------------------------------------------------------------------------------- the job's state
def job_status(out: Path) -> str:
    """running, stopped (resumable), finished, incomplete (requests failed: run again), failed, or new."""
    folder = job_folder(out)
    if runs.running_pid(folder) is not None or runs.make_data_writing(out):
        return "running"
    code = runs.exit_code(folder)
    if code == 0:
        return "finished"
    if code == 1:
        return "incomplete"
    if code in (EXIT_INTERRUPTED, -signal.SIGINT):  # a SIGINT before make-data's own handling of it began
        return "stopped"
    if code is not None:
        return "failed"
    return "stopped" if (folder / "settings.json").is_file() else "new"


def progress_markdown(out: Path, status: str, lang: str = "en") -> str:
    """The job as far as its files say: chunks asked, questions answered, rows kept; after a run its summary."""
    folder = job_folder(out)
    chunks = read_lines(folder / "chunks.jsonl")
    log = read_lines(folder / "log.jsonl")
    asked = {e["chunk"] for e in log if "chunk" in e and ("questions" in e or "refused" in e)}
    questions = sum(len(e["questions"]) for e in log if isinstance(e.get("questions"), list))
    decided = {e["question"]: e for e in log if "question" in e}
    train, held_out = read_lines(out), read_lines(eval_path(out))
    kept_ids = {r.get("id") for r in train + held_out}
    refused = sum(1 for qid, e in decided.items() if not e.get("kept") and qid not in kept_ids)
    head = f"**{out.name}**: {t(f'md_status_{status}', lang)}"
    if not chunks and not log:
        return head
    lines = [head + f" · {t('md_chunks_asked', lang)} {len(asked)} / {len(chunks)} · "
             f"{t('md_questions_answered', lang)} {len(decided)} / {questions} · "
             f"{t('md_rows', lang)} {len(train)} + {len(held_out)} {t('md_held_out', lang)} · "
             f"{t('md_refused', lang)} {refused}"]
    summary = runs.read_json(folder / "summary.json") if status != "running" else {}
    if summary:
        reasons = ", ".join(f"{reason} ({n})" for reason, n in list(summary.get("refused", {}).items())[:6])
        if reasons:
            lines.append(f"{t('md_refused_by_reason', lang)}: {reasons}")
        failed = summary.get("failed_requests") or {}
        todo = (summary.get("chunks_not_asked", 0), summary.get("questions_not_answered", 0))
        if failed or any(todo):
            lines.append(t("md_incomplete", lang).format(failed=", ".join(f"{k} ({n})" for k, n in failed.items())
                                                         or "0", chunks=todo[0], questions=todo[1]))
        lines += [f"`{line}`" for line in summary.get("lengths", [])]
    return "  \n".join(lines)


# ------------------------------------------------------------------------------------------------ the dry run
def plan_text(output: str) -> list[str]:
    """The plan's lines of the dry run's output (chunks, requests, tokens) and the files it skipped."""
    return [line.strip() for line in output.splitlines()
            if line.startswith(("chunks:", "requests:", "tokens:", "  skipped "))]


def chunk_table(out: Path, output: str = "", lang: str = "en") -> str:
    """The dry run's chunks (preview.jsonl) as a table, each chunk's text folded under its first words."""
    chunks = read_lines(job_folder(out) / PREVIEW_FILE)
    if not chunks:
        return ""
    rows = []
    for c in chunks:
        text = c.get("text", "")
        first = " ".join(text.split())[:90]
        rows.append(f"<tr data-chunk='{html.escape(c.get('id', ''))}'><td>{html.escape(c.get('id', ''))}</td>"
                    f"<td>{html.escape(c.get('source', ''))}</td><td>{html.escape(str(c.get('pages', '')))}</td>"
                    f"<td>{html.escape(c.get('section', ''))}</td><td>{c.get('tokens', '')}</td>"
                    f"<td>{t('md_split_' + c.get('split', 'train'), lang)}</td>"
                    f"<td><details><summary>{html.escape(first)}…</summary><pre class='md-chunk-text'>"
                    f"{html.escape(text)}</pre></details></td></tr>")
    plan = "".join(f"<li>{html.escape(line)}</li>" for line in plan_text(output))
    heads = "".join(f"<th>{t(name, lang)}</th>" for name in ("md_col_id", "md_col_document", "md_col_pages",
                                                            "md_col_section", "md_col_tokens", "md_col_split",
                                                            "md_col_text"))
    return (f"<ul class='md-plan'>{plan}</ul>" if plan else "") + \
        f"<table class='md-chunks'><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# ------------------------------------------------------------------------------------------------ errors
def error_fields(message: str, output: str, request: Request) -> dict[str, str]:
    """A failed make-data's `error:` block under the field it concerns (the URL, the key, the model, the documents,
    the rows file, the student, a number), or {} when it names none (then the box beside the buttons shows the last
    lines). The files make-data skipped go with an error about the documents."""
    if not message:
        return {}
    title = message.splitlines()[0]
    url = request.url.strip().rstrip("/")
    if "refused the API key" in title:
        return {"key": message}
    if "does not serve the model" in title:
        return {"model": message}
    if url and url in title:
        return {"url": message}
    if title.startswith(("None of the", "The documents hold no text", "Document source not found")):
        skipped = "\n".join(line.strip() for line in output.splitlines() if line.startswith("  skipped "))
        return {"documents": message + (f"\n\n{skipped}" if skipped else "")}
    student = Path(request.student.strip()).name
    if "tokenizer" in title.lower() or (student and student in title):
        return {"student": message}
    if "make-data cannot start" in title or title.startswith("--context"):
        fields: dict[str, list[str]] = {}
        for line in message.splitlines()[1:] if "cannot start" in title else [title]:
            line = line.strip().removeprefix("- ")
            # Each problem starts with the flag it concerns ("--context 300 leaves ...", "--out is needed").
            name = "documents" if line.startswith("no SOURCE") else FLAG_FIELDS.get(line.split(" ")[0].rstrip(":"))
            if name:
                fields.setdefault(name, []).append(line)
        return {name: "\n".join(lines) for name, lines in fields.items()}
    if request.out and (Path(request.out).name in title or "job started with other settings" in title):
        return {"out": message}
    return {}


# ------------------------------------------------------------------------------------------------ review
def review_label(number: int, item: Reviewed) -> str:
    mark = {"accepted": " ✓", "edited": " ✎"}.get(item.row.get("reviewed", ""), "")
    held = " [eval]" if item.split == "eval" else ""
    return f"{number}.{held} {item.row.get('Question', '')[:90]}{mark}"


def source_html(item: Reviewed | None, lang: str = "en") -> str:
    """The chunk a row was made from, as the teacher read it: document, pages, section, its text."""
    if item is None:
        return ""
    chunk = item.chunk
    if chunk is None:
        return f"<p>{html.escape(t('md_no_chunk', lang))}</p>"
    where = " · ".join(part for part in (chunk.get("source", ""), chunk.get("pages", "") and
                                         f"{t('md_col_pages', lang)} {chunk['pages']}", chunk.get("section", ""),
                                         t("md_split_" + chunk.get("split", "train"), lang)) if part)
    score = item.row.get("score")
    judged = f" · {t('md_score', lang)} {score}" if score is not None else ""
    return (f"<div class='md-source' data-chunk='{html.escape(chunk.get('id', ''))}'><b>{html.escape(where)}</b>"
            f"{html.escape(judged)}<pre class='md-chunk-text'>{html.escape(chunk.get('text', ''))}</pre></div>")


def review_markdown(counts: dict[str, int], lang: str = "en") -> str:
    return t("md_review_counts", lang).format(**counts)
