"""The "Make data from documents" screen (before Model & data): documents in, reviewed rows out, through
`qlora-kit make-data` run as a child process.

    pick or upload documents ─► teacher (URL, model, a key for the child's environment only) ─► Preview: the dry
    run's chunks ─► Start / Stop (SIGINT) / Resume: the job, followed through its files ─► review each row beside
    its chunk (accept / edit / drop: make_data.review) ─► "Use these rows": data.source and data.eval_source

The key field is a password box whose value goes into the child's environment as OPENAI_API_KEY and nowhere else:
not an argument, not the command the studio saves for Resume, not a log or a file. Review rewrites the rows files,
so it is refused while a make-data job writes them. The layout is `layout()`, the events `wire()`; what the screen
shows is made from files by make_data_views.py.

A field's error is the command's message in red under the field, as on the other screens, but in a box of this
screen's own rather than Gradio's validation message: this screen follows its job with a timer, and every tick of a
timer takes Gradio's messages away (Gradio 6.31).
"""

from __future__ import annotations

import html
import os
import signal
from pathlib import Path
from typing import Any

import gradio as gr

from qlora_kit.errors import UserError
from qlora_kit.make_data import review
from qlora_kit.make_data.documents import KINDS
from qlora_kit.make_data.job import PREVIEW_FILE, eval_path, job_folder, read_lines
from qlora_kit.studio import make_data_views as views
from qlora_kit.studio import runs
from qlora_kit.studio.i18n import LANGUAGES, t
from qlora_kit.studio.views import error_box
from qlora_kit.studio.workspace import Workspace

DEFAULT_URL = "http://127.0.0.1:11434/v1"
DEFAULT_OUT = "data/rows.jsonl"
UPLOAD_FOLDER = "documents"

CSS = """
.md-chunks { border-collapse: collapse; width: 100%; font-size: 0.85em; }
.md-chunks th, .md-chunks td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
.md-chunk-text { white-space: pre-wrap; font-size: 0.85em; max-height: 28em; overflow-y: auto; margin: 4px 0; }
.md-source { border: 1px solid #ddd; border-radius: 4px; padding: 6px; }
.md-field-error { padding: 0 !important; min-height: 0 !important; }
.md-field-message { color: #b71c1c; white-space: pre-wrap; font-size: 0.9em; }
#md-log textarea { font-family: monospace; font-size: 0.8em; }
#md-status [data-testid='status-tracker'], #md-log [data-testid='status-tracker'] { display: none !important; }
"""


def lang_code(choice) -> str:
    return LANGUAGES.get(choice, "en")


class MakeDataScreen:
    def __init__(self, ws: Workspace, tr, students: list[str], student: str):
        self.ws, self.tr = ws, tr
        self.students, self.student_default = students, student
        self.messages: dict[str, Any] = {}
        """Field name (views.FIELDS) -> the box under it where its error is said."""

    def under(self, name: str, component):
        """`component` with the box for its errors under it (call inside the column that holds both)."""
        self.messages[name] = gr.HTML("", elem_id=f"md-{name.replace('_', '-')}-error",
                                      elem_classes=["md-field-error"])
        return component

    # ------------------------------------------------------------------------------------------------ layout
    def layout(self) -> None:
        tr, under = self.tr, self.under
        tr(gr.Markdown(t("md_intro")), "md_intro", "value")
        with gr.Row():
            with gr.Column(scale=3):
                self.documents = under("documents", tr(gr.Dropdown(
                    views.list_documents(self.ws.root), value=[], multiselect=True, allow_custom_value=True,
                    label=t("md_documents"), elem_id="md-documents"), "md_documents"))
            with gr.Column(scale=2):
                self.upload = tr(gr.File(label=t("md_upload"), file_count="multiple", elem_id="md-upload",
                                         file_types=sorted(KINDS), height=120), "md_upload")
                self.refresh = tr(gr.Button(t("md_refresh"), size="sm", elem_id="md-refresh"), "md_refresh", "value")
        with gr.Row():
            with gr.Column():
                self.url = under("url", tr(gr.Textbox(DEFAULT_URL, label=t("md_url"), elem_id="md-url"), "md_url"))
            with gr.Column():
                self.model = under("model", tr(gr.Textbox("", label=t("md_model"), elem_id="md-model"), "md_model"))
            with gr.Column():
                # A password box: the browser shows dots. Read by Start and Resume only, and handed to the child's
                # environment (views.key_environment).
                self.key = under("key", tr(gr.Textbox("", type="password", label=t("md_key"), elem_id="md-key"),
                                           "md_key"))
        with gr.Row():
            with gr.Column():
                self.student = under("student", tr(gr.Dropdown(
                    self.students, value=self.student_default, allow_custom_value=True, label=t("md_student"),
                    elem_id="md-student"), "md_student"))
            with gr.Column():
                self.out = under("out", tr(gr.Dropdown(
                    sorted({DEFAULT_OUT, *views.list_jobs(self.ws.root)}), value=DEFAULT_OUT, allow_custom_value=True,
                    label=t("md_out"), elem_id="md-out"), "md_out"))
        with gr.Row():
            numbers = (("questions", 3, "md_questions"), ("max_chunks", 0, "md_max_chunks"),
                       ("context", 4096, "md_context"), ("concurrency", 0, "md_concurrency"))
            for name, value, label in numbers:
                with gr.Column(min_width=140):
                    setattr(self, name, under(name, tr(gr.Number(value, precision=0, label=t(label),
                                                                 elem_id=f"md-{name.replace('_', '-')}"), label)))
            with gr.Column(min_width=140):
                self.lang = under("lang", tr(gr.Radio(["auto", "en", "zh"], value="auto", label=t("md_lang"),
                                                      elem_id="md-lang"), "md_lang"))
        with gr.Row():
            self.preview_btn = tr(gr.Button(t("md_preview_btn"), elem_id="md-preview"), "md_preview_btn", "value")
            self.start_btn = tr(gr.Button(t("md_start"), variant="primary", elem_id="md-start"), "md_start", "value")
            self.stop_btn = tr(gr.Button(t("md_stop"), variant="stop", elem_id="md-stop"), "md_stop", "value")
            self.resume_btn = tr(gr.Button(t("md_resume"), elem_id="md-resume"), "md_resume", "value")
        self.error = gr.HTML(elem_id="md-error")
        self.status = gr.Markdown("", elem_id="md-status")
        self.chunks = gr.HTML(elem_id="md-chunks")
        self.log = tr(gr.Textbox(label=t("md_log"), lines=8, max_lines=8, elem_id="md-log", autoscroll=True),
                      "md_log")
        self.seen = gr.State("")
        # The job the screen follows: its rows file and the fields that started it (never the key).
        self.following = gr.State({})
        # Ticking only while this screen is shown and a job runs (the last tick of a job stops it).
        self.timer = gr.Timer(1.0, active=False)

        tr(gr.Markdown(t("md_review_title")), "md_review_title", "value")
        tr(gr.Markdown(t("md_review_help")), "md_review_help", "value")
        with gr.Row():
            self.row = tr(gr.Dropdown([], value=None, label=t("md_review_row"), elem_id="md-review-row", scale=4),
                          "md_review_row")
            self.load_btn = tr(gr.Button(t("md_review_load"), elem_id="md-review-load", scale=1), "md_review_load",
                               "value")
        with gr.Row():
            self.source = gr.HTML(elem_id="md-review-source")
            with gr.Column():
                self.question = gr.Textbox(label="Question", lines=2, elem_id="md-review-question")
                self.cot = gr.Textbox(label="Complex_CoT", lines=6, max_lines=16, elem_id="md-review-cot")
                self.response = gr.Textbox(label="Response", lines=4, max_lines=12, elem_id="md-review-response")
                with gr.Row():
                    self.accept_btn = tr(gr.Button(t("md_accept"), elem_id="md-accept"), "md_accept", "value")
                    self.save_btn = tr(gr.Button(t("md_save"), variant="primary", elem_id="md-save"), "md_save",
                                       "value")
                    self.drop_btn = tr(gr.Button(t("md_drop"), variant="stop", elem_id="md-drop"), "md_drop", "value")
        self.review_status = gr.Markdown("", elem_id="md-review-status")
        self.review_error = gr.HTML(elem_id="md-review-error")
        self.use_btn = tr(gr.Button(t("md_use_rows"), variant="primary", elem_id="md-use-rows"), "md_use_rows",
                          "value")

    def painted(self, errors: dict[str, str]) -> dict[Any, str]:
        """Every field's box: the message of a field with an error, nothing under the others."""
        return {box: (f"<div class='md-field-message'>{html.escape(errors[name])}</div>" if name in errors else "")
                for name, box in self.messages.items()}

    # ------------------------------------------------------------------------------------------------ events
    def wire(self, page, page_lang, tabs, data_box, eval_box, max_length_box) -> None:
        ws = self.ws
        boxes = list(self.messages.values())
        request_inputs = [self.documents, self.out, self.url, self.model, self.student, max_length_box,
                          self.questions, self.lang, self.max_chunks, self.context, self.concurrency]

        def request_of(values) -> views.Request:
            documents, out, url, model, student, max_length, questions, lang, max_chunks, context, \
                concurrency = values
            return views.Request(list(documents or []), str(out or ""), str(url or ""), str(model or ""),
                                 str(student or ""), max_length, questions, lang, max_chunks, context, concurrency)

        def refreshed(chosen):
            documents = views.list_documents(ws.root)
            jobs = sorted({DEFAULT_OUT, *views.list_jobs(ws.root)})
            return gr.update(choices=sorted({*documents, *(chosen or [])}), value=chosen or []), \
                gr.update(choices=jobs)

        self.refresh.click(refreshed, self.documents, [self.documents, self.out])

        def on_upload(files, chosen):
            if not files:
                return {}
            saved = list(chosen or [])
            for file in files if isinstance(files, list) else [files]:
                try:
                    path = ws.save_upload(file, Path(file).name, UPLOAD_FOLDER)
                except UserError as error:
                    return self.painted({"documents": error.render()})
                name = str(path.relative_to(ws.root))
                saved += [name] if name not in saved else []
            return {self.documents: gr.update(choices=sorted({*views.list_documents(ws.root), *saved}), value=saved),
                    **self.painted({})}

        self.upload.upload(on_upload, [self.upload, self.documents], [self.documents, *boxes])

        def on_preview(*values):
            *values, lang_choice = values
            code = lang_code(lang_choice)
            request = request_of(values)
            try:
                args = views.command_args(ws, request, dry_run=True)
            except views.FieldErrors as problem:
                yield {self.error: "", **self.painted(problem.errors)}
                return
            yield {self.error: "", self.chunks: "", self.log: "…", **self.painted({})}
            out = views.rows_path(ws, request.out)
            (job_folder(out) / PREVIEW_FILE).unlink(missing_ok=True)
            for text, status in runs.stream(runs.command(*args), ws.root):
                if status is None:
                    yield {self.log: text}
                elif status != 0:
                    errors = views.error_fields(runs.cli_error(text), text, request)
                    box = "" if errors else error_box(runs.failure_text(text, status, "The dry run"))
                    yield {self.error: box, self.log: text, **self.painted(errors)}
                else:
                    yield {self.error: "", self.chunks: views.chunk_table(out, text, code), self.log: text}

        self.preview_btn.click(on_preview, [*request_inputs, page_lang],
                               [self.error, self.chunks, self.log, *boxes])

        def start(args: list[str], out: Path, key: str, lang: str, request: views.Request) -> dict:
            if views.job_status(out) == "running":
                return {self.error: error_box(t("md_already_running", lang)), **self.painted({})}
            views.save_command(out, args)
            runs.start_job(job_folder(out), tuple(args), ws.root, views.key_environment(key))
            return {self.error: "", self.seen: "", self.following: views.following(out, request),
                    self.timer: gr.Timer(active=True), **self.painted({})}

        def on_start(*values):
            *values, key, lang_choice = values
            request = request_of(values)
            try:
                args = views.command_args(ws, request)
            except views.FieldErrors as problem:
                return {self.error: "", **self.painted(problem.errors)}
            return start(args, views.rows_path(ws, request.out), key, lang_code(lang_choice), request)

        start_outputs = [self.error, self.seen, self.following, self.timer, *boxes]
        self.start_btn.click(on_start, [*request_inputs, self.key, page_lang], start_outputs)

        def on_resume(*values):
            *values, key, lang_choice = values
            request = request_of(values)
            try:
                out = views.rows_path(ws, request.out)
            except views.FieldErrors as problem:
                return {self.error: "", **self.painted(problem.errors)}
            args = views.saved_command(out)
            if not args:
                return {self.error: error_box(t("md_no_command", lang_code(lang_choice)))}
            return start(args, out, key, lang_code(lang_choice), request)

        self.resume_btn.click(on_resume, [*request_inputs, self.key, page_lang], start_outputs)

        def on_stop(out_text, lang_choice):
            try:
                out = views.rows_path(ws, out_text)
            except views.FieldErrors as problem:
                return {self.error: "", **self.painted(problem.errors)}
            # SIGINT: make-data's Ctrl-C, which keeps what was kept and writes the summary (exit 130).
            stopped = runs.stop_run(job_folder(out))
            for pid in [] if stopped else runs.make_data_writing(out):  # a job the command line started
                try:
                    os.kill(pid, signal.SIGINT)
                    stopped = True
                except OSError:  # ended meanwhile, or another user's process
                    continue
            return {self.error: "" if stopped else error_box(t("md_not_running", lang_code(lang_choice)))}

        self.stop_btn.click(on_stop, [self.out, page_lang], [self.error, *boxes])

        def follow(values) -> dict:
            request = request_of(values)
            try:
                return views.following(views.rows_path(ws, request.out), request)
            except views.FieldErrors:
                return {}

        self.out.change(lambda *values: (follow(values), gr.Timer(active=True)), request_inputs,
                        [self.following, self.timer], show_progress="hidden")

        def on_open(*values):
            """A reopened page follows the job that is running (started here or by the command line), if any."""
            jobs = views.list_jobs(ws.root)
            running = [job for job in jobs if views.job_status(ws.root / job) == "running"]
            values = list(values)
            if running:
                values[1] = running[0]
            return gr.update(choices=sorted({DEFAULT_OUT, *jobs}), value=values[1]), follow(values)

        page.load(on_open, request_inputs, [self.out, self.following])

        def on_tick(followed, lang_choice, last):
            """Every second while this screen is shown and a job runs: the job's line and the log when its files
            changed; when the child has ended, its error under the field it concerns and its rows to review."""
            code = lang_code(lang_choice)
            if not followed:
                return {self.timer: gr.Timer(active=False)}
            out, request = Path(followed["out"]), views.Request(**followed["request"])
            folder = job_folder(out)
            status = views.job_status(out)
            sizes = [str(p.stat().st_size) if p.exists() else "-" for p in
                     (folder / "log.jsonl", folder / runs.LOG_FILE, out, eval_path(out), folder / "summary.json")]
            signature = "|".join([status, str(out), *sizes, code])
            ticking = gr.Timer(active=status == "running")
            if signature == last:
                return {self.timer: ticking}
            run_text = runs.log_tail(folder, 400).rpartition("\n$ qlora-kit ")[2]  # this run's output
            update = {self.status: views.progress_markdown(out, status, code), self.seen: signature,
                      self.log: "\n".join(run_text.splitlines()[-20:]), self.timer: ticking}
            if status == "failed":
                errors = views.error_fields(runs.cli_error(run_text), run_text, request)
                update[self.error] = "" if errors else \
                    error_box(runs.failure_text(run_text, runs.exit_code(folder) or 2, "make-data"))
                update.update(self.painted(errors))
            elif status != "running" and (last or "").split("|")[0] == "running":
                update[self.row] = review_choices(out, None)  # the job just ended: its rows, ready to review
            return update

        self.timer.tick(on_tick, [self.following, page_lang, self.seen],
                        [self.status, self.log, self.error, self.row, self.seen, self.timer, *boxes],
                        show_progress="hidden")

        # ---------------------------------------------------------------------------------------------- review
        def review_choices(out: Path, selected: str | None):
            found = review.rows(out)
            choices = [(views.review_label(n, item), item.row["id"]) for n, item in enumerate(found, start=1)]
            ids = [value for _, value in choices]
            return gr.update(choices=choices, value=selected if selected in ids else (ids[0] if ids else None))

        def reviewable(out_text, lang: str) -> Path:
            out = views.rows_path(ws, out_text)
            if views.job_status(out) == "running":
                raise UserError(t("md_running_no_review", lang))
            return out

        def shown(out: Path, row_id: str | None, lang: str) -> dict:
            """The row's chunk, its three fields, and the review's counts."""
            item = next((r for r in review.rows(out) if r.row["id"] == row_id), None)
            row = item.row if item else {}
            return {self.source: views.source_html(item, lang), self.question: row.get("Question", ""),
                    self.cot: row.get("Complex_CoT", ""), self.response: row.get("Response", ""),
                    self.review_status: views.review_markdown(review.counts(out), lang), self.review_error: ""}

        review_outputs = [self.row, self.source, self.question, self.cot, self.response, self.review_status,
                          self.review_error]

        def on_load(out_text, row_id, lang_choice):
            code = lang_code(lang_choice)
            try:
                out = reviewable(out_text, code)
            except (UserError, views.FieldErrors) as error:
                return {self.review_error: error_box(problem_text(error))}
            update = review_choices(out, row_id)
            return {self.row: update, **shown(out, update["value"], code),
                    **({} if update["choices"] else {self.review_error: error_box(t("md_no_rows", code))})}

        self.load_btn.click(on_load, [self.out, self.row, page_lang], review_outputs)

        def on_pick(out_text, row_id, lang_choice):
            try:
                return shown(views.rows_path(ws, out_text), row_id, lang_code(lang_choice))
            except views.FieldErrors as error:
                return {self.review_error: error_box(problem_text(error))}

        self.row.change(on_pick, [self.out, self.row, page_lang], review_outputs[1:], show_progress="hidden")

        def act(action):
            def handler(out_text, row_id, question, cot, response, lang_choice):
                code = lang_code(lang_choice)
                try:
                    out = reviewable(out_text, code)
                    if not row_id:
                        raise UserError(t("md_no_rows", code))
                    ids = [r.row["id"] for r in review.rows(out)]
                    if action == "accept":
                        review.accept(out, row_id)
                    elif action == "edit":
                        review.edit(out, row_id, question or "", cot or "", response or "")
                    else:
                        review.drop(out, row_id)
                except (UserError, views.FieldErrors) as error:
                    return {self.review_error: error_box(problem_text(error))}
                # Accept moves on to the next row, drop to the row that takes its place; an edit stays, to be read.
                at = ids.index(row_id) if row_id in ids else 0
                left = [i for i in ids if i != row_id] if action == "drop" else ids
                following = row_id if action == "edit" else (left[min(at + (action == "accept"), len(left) - 1)]
                                                             if left else None)
                update = review_choices(out, following)
                return {self.row: update, **shown(out, update["value"], code)}
            return handler

        review_inputs = [self.out, self.row, self.question, self.cot, self.response, page_lang]
        self.accept_btn.click(act("accept"), review_inputs, review_outputs)
        self.save_btn.click(act("edit"), review_inputs, review_outputs)
        self.drop_btn.click(act("drop"), review_inputs, review_outputs)

        def workspace_path(path: Path) -> str:
            return str(path.relative_to(ws.root)) if path.is_relative_to(ws.root) else str(path)

        def on_use(out_text, lang_choice):
            try:
                out = views.rows_path(ws, out_text)
            except views.FieldErrors as error:
                return {self.review_error: error_box(problem_text(error))}
            if not read_lines(out):
                return {self.review_error: error_box(t("md_no_rows", lang_code(lang_choice)))}
            held_out = eval_path(out)
            return {data_box: workspace_path(out), eval_box: workspace_path(held_out) if read_lines(held_out) else "",
                    tabs: gr.Tabs(selected="model"), self.review_error: ""}

        self.use_btn.click(on_use, [self.out, page_lang], [data_box, eval_box, tabs, self.review_error])


def problem_text(error: Exception) -> str:
    if isinstance(error, views.FieldErrors):
        return "\n".join(error.errors.values())
    return error.render() if isinstance(error, UserError) else str(error)
