# ruff: noqa: F811 (the fixtures imported from studio_fixtures are parameters of the tests below)
"""The studio's "Make data from documents" screen: the command its fields make, a failed command's message under
the field it concerns (from real make-data failures), a job the command line started found before a review rewrites
its files, and the whole screen in a real browser (Debian's chromium through Playwright) against a real studio and the
tests' own OpenAI-compatible teacher (tests/teacher_server.py): pick and upload documents, preview the chunks, start,
stop mid-job, resume, review (edit, drop, accept), use the rows, and an unreachable teacher under the URL field. The
API key typed into the page reaches the child's environment and no file of the workspace."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from studio_fixtures import SCREENSHOTS, browser, free_port, page, studio, teacher  # noqa: F401 (fixtures)

from qlora_kit.errors import UserError
from qlora_kit.make_data.job import read_lines
from qlora_kit.studio import make_data_views as views
from qlora_kit.studio import runs
from qlora_kit.studio.workspace import Workspace

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "qlora_kit" / "demo" / "tiny-qwen2"
HEPATITIS = """# Hepatitis B

Hepatitis B is an infection of the liver caused by the hepatitis B virus. It spreads through contact with infected
blood and body fluids.

## Prevention

A vaccine prevents hepatitis B infection in most people who receive all doses. Screening of donated blood also lowers
the risk of transmission.
"""
PRESSURE = """<html><body><h1>Blood pressure</h1><p>Blood pressure is the force of circulating blood on the walls of
the arteries. A reading of 120 over 80 is usually considered normal for adults.</p><h2>Hypertension</h2><p>High blood
pressure raises the risk of stroke and heart disease over many years. Lifestyle changes and medicines can lower it
effectively.</p></body></html>
"""


def make_data(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit", "make-data", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------- without a browser
def test_the_command_confines_every_path_and_never_carries_the_key(tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(HEPATITIS, encoding="utf-8")
    request = views.Request(["docs/a.md"], "data/rows.jsonl", "http://127.0.0.1:9/v1", "teacher",
                            str(DEMO_TOKENIZER), 512, 2, "en", 0, 8192, None)
    args = views.command_args(ws, request)
    assert args == ["make-data", str(tmp_path / "docs" / "a.md"), "--out", str(tmp_path / "data" / "rows.jsonl"),
                    "--base-url", "http://127.0.0.1:9/v1", "--model", "teacher", "--tokenizer", str(DEMO_TOKENIZER),
                    "--max-length", "512", "--questions-per-chunk", "2", "--max-chunks", "0", "--context", "8192",
                    "--lang", "en"]
    assert views.command_args(ws, request, dry_run=True)[-1] == "--dry-run"
    assert views.key_environment(" sk-secret ") == {"OPENAI_API_KEY": "sk-secret"}
    assert views.key_environment("") == {}, "no key typed: the studio's own environment decides"
    assert views.list_documents(tmp_path) == ["docs/a.md"]

    outside = views.Request(["../elsewhere.pdf"], "../rows.jsonl")
    with pytest.raises(views.FieldErrors) as caught:
        views.command_args(ws, outside)
    assert set(caught.value.errors) == {"documents", "out"}
    assert "outside the studio's workspace" in caught.value.errors["documents"]

    # A GGUF student: its tokenizer is read through a recipe in the job's folder (the CLI's way of reading one).
    gguf = tmp_path / "models" / "student.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    args = views.command_args(ws, views.Request(["docs/a.md"], "data/rows.jsonl", student=str(gguf)))
    recipe = tmp_path / "data" / "rows.job" / views.STUDENT_RECIPE
    assert args[args.index("--recipe") + 1] == str(recipe)
    assert str(gguf) in recipe.read_text(encoding="utf-8")


def test_a_failed_commands_message_goes_under_the_field_it_concerns(teacher, tmp_path):
    from qlora_kit.make_data.cli import check_args, parse_args
    from qlora_kit.make_data.teacher import Teacher

    dead = f"http://127.0.0.1:{free_port()}/v1"
    request = views.Request(["a.md"], "data/rows.jsonl", dead, "test-teacher", str(DEMO_TOKENIZER))

    def message_of(call) -> str:
        with pytest.raises(UserError) as caught:
            call()
        return caught.value.render()

    unreachable = message_of(lambda: Teacher(dead, "test-teacher").check())
    assert list(views.error_fields(unreachable, "", request)) == ["url"]
    locked = teacher("locked")
    refused = message_of(lambda: Teacher(locked.url, "test-teacher").check())
    assert list(views.error_fields(refused, "", views.Request([], "x.jsonl", locked.url))) == ["key"]
    good = teacher("good")
    wrong = message_of(lambda: Teacher(good.url, "test-teachr").check())
    assert "did you mean `test-teacher`" in wrong
    assert list(views.error_fields(wrong, "", views.Request([], "x.jsonl", good.url, "test-teachr"))) == ["model"]
    numbers = message_of(lambda: check_args(parse_args(["a.md", "--questions-per-chunk", "0", "--concurrency",
                                                        "0", "--out", "rows.jsonl"])))
    assert views.error_fields(numbers, "", request) == {
        "url": "--base-url is needed", "model": "--model is needed",
        "questions": "--questions-per-chunk must be at least 1, got 0",
        "concurrency": "--concurrency must be at least 1, got 0"}

    # A bad file (the only document): the CLI's message and the reason it skipped the file, under the documents.
    (tmp_path / "broken.pdf").write_bytes(b"this is not a PDF")
    done = make_data(tmp_path, "broken.pdf", "--out", "rows.jsonl", "--dry-run")
    assert done.returncode == 2
    output = done.stdout + done.stderr
    fields = views.error_fields(runs.cli_error(output), output, views.Request(["broken.pdf"], "rows.jsonl"))
    assert list(fields) == ["documents"]
    assert "None of the 1 file(s) could be read" in fields["documents"] and "skipped broken.pdf" in fields["documents"]


@pytest.mark.slow
def test_a_job_the_command_line_started_is_found_before_a_review_rewrites_its_files(teacher, tmp_path):
    slow = teacher("slow")
    (tmp_path / "a.md").write_text(HEPATITIS, encoding="utf-8")
    out = tmp_path / "data" / "rows.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit", "make-data", "a.md", "--out", "data/rows.jsonl",
                             "--base-url", slow.url, "--model", "test-teacher", "--tokenizer", str(DEMO_TOKENIZER),
                             "--concurrency", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        log = out.parent / "rows.job" / "log.jsonl"
        while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:  # its requests under way
            time.sleep(0.2)
        assert runs.make_data_writing(out) == [proc.pid]
        assert views.job_status(out) == "running", "no studio child: found through its command line"
        assert runs.make_data_writing(tmp_path / "data" / "other.jsonl") == []
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    assert runs.make_data_writing(out) == []
    assert views.job_status(out) == "stopped"


# ------------------------------------------------------------------------------------------- in the browser
def choose(page, elem_id: str, option) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option).first.click()
    page.keyboard.press("Escape")


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def text_box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=re.compile(name)).click()


def wait_text(page, selector: str, pattern: str, timeout: float = 120) -> str:
    """Poll an element's text until it matches `pattern`; fail with what it showed instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        loc = page.locator(selector)
        try:  # an element redrawn between the two calls is read again at the next turn
            if loc.count():
                boxes = loc.first.locator("textarea")
                text = boxes.first.input_value(timeout=2000) if boxes.count() else loc.first.inner_text(timeout=2000)
                if re.search(pattern, text):
                    return text
        except PlaywrightTimeout:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{selector} never matched {pattern!r}; it showed:\n{text}")


def field_error(page, field: str, pattern: str, timeout: float = 120) -> str:
    """The message under a field of the screen (in red, in the box below it), once it matches `pattern`."""
    return wait_text(page, f"#md-{field}-error .md-field-message", pattern, timeout)


def marked(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('.md-field-message')].map(e => e.closest('[id^=md-]').id)")


def rows_shown(text: str) -> tuple[int, int]:
    found = re.search(r"rows (\d+) \+ (\d+) held out", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def shoot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"studio-{name}.png"), full_page=True)


@pytest.mark.slow
def test_documents_to_reviewed_rows_in_the_browser(page, studio, teacher, tmp_path):
    slow = teacher("slow")
    began = time.monotonic()
    laps = []

    def lap(name: str) -> None:
        laps.append(f"{name} {time.monotonic() - began:.0f} s")
    root = studio.root
    (root / "docs").mkdir()
    (root / "docs" / "hepatitis.md").write_text(HEPATITIS, encoding="utf-8")
    upload = tmp_path / "pressure.html"
    upload.write_text(PRESSURE, encoding="utf-8")
    key = "sk-test-" + secrets.token_hex(12)

    # ---- documents: one picked from the workspace, one uploaded; the teacher; the student's tokenizer
    tab(page, "Make data")
    page.locator("#md-refresh").click()
    choose(page, "md-documents", "docs/hepatitis.md")
    page.locator("#md-upload input[type=file]").set_input_files(str(upload))
    wait_text(page, "#md-documents", r"documents/pressure\.html")
    assert (root / "documents" / "pressure.html").read_text(encoding="utf-8") == PRESSURE
    assert "docs/hepatitis.md" in page.locator("#md-documents").inner_text()
    text_box(page, "md-url").fill(slow.url)
    text_box(page, "md-model").fill(slow.model)
    page.locator("#md-key input").fill(key)
    assert page.locator("#md-key input").get_attribute("type") == "password"
    student = page.locator("#md-student input")
    student.fill(str(DEMO_TOKENIZER))
    student.press("Enter")
    set_number(page, "md-concurrency", 1)  # one request at a time: the job lasts long enough to stop it midway
    set_number(page, "md-questions", 2)  # 2 chunks x (questions + 2 x (answer + judge)): 10 requests of 1 s

    lap("preview")
    # ---- preview: the dry run's chunks, one per document, one of the two held out
    page.locator("#md-preview").click()
    page.wait_for_selector("#md-chunks tr[data-chunk]", timeout=120_000)
    table = page.locator("#md-chunks").inner_text()
    assert page.locator("#md-chunks tr[data-chunk]").count() == 2
    assert "docs/hepatitis.md" in table and "documents/pressure.html" in table and "held out" in table
    assert "chunks: 2 (1 train, 1 held out)" in table
    assert not (root / "data" / "rows.jsonl").exists(), "a dry run sends nothing and keeps no row"
    shoot(page, "make-data")

    lap("start")
    # ---- start; the key is in the child's environment; stop midway (SIGINT); resume to the end
    page.locator("#md-start").click()
    running = wait_text(page, "#md-status", r"running .*rows [1-9]\d* \+|running .*rows \d+ \+ [1-9]", 120)
    pid = int((root / "data" / "rows.job" / runs.PID_FILE).read_text())
    assert f"OPENAI_API_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert key not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    page.locator("#md-review-load").click()  # its files only grow while it runs: no review yet
    wait_text(page, "#md-review-error", r"The job is running", 30)
    page.locator("#md-stop").click()
    stopped = wait_text(page, "#md-status", r"stopped", 60)
    kept_at_stop = sum(rows_shown(stopped))
    assert 1 <= sum(rows_shown(running)) <= kept_at_stop < 4, stopped
    assert "stopped" in wait_text(page, "#md-log", r"stopped")
    page.locator("#md-resume").click()
    finished = wait_text(page, "#md-status", r"finished", 180)
    assert rows_shown(finished) == (2, 2), finished
    wait_text(page, "#md-log", r"continuing")

    lap("review")
    # ---- review: each row beside its chunk; edit one, drop one, accept one
    data = root / "data"
    out, held_out, log = data / "rows.jsonl", data / "rows.eval.jsonl", data / "rows.job" / "log.jsonl"
    page.locator("#md-review-load").click()
    wait_text(page, "#md-review-status", r"4 rows")
    first = read_lines(out)[0]
    source = wait_text(page, "#md-review-source", r"\S")
    assert first["source"] in source and "Question" not in source
    assert " ".join(first["Question"].removeprefix("What follows from: ").rstrip("?").split()[:5]) in \
        " ".join(source.split()), "the row's chunk is shown beside it"
    assert text_box(page, "md-review-question").input_value() == first["Question"]
    text_box(page, "md-review-response").fill("An edited answer, written by a person.")
    page.locator("#md-save").click()
    wait_text(page, "#md-review-status", r"edited 1")
    edited = next(r for r in read_lines(out) if r["id"] == first["id"])
    assert edited["Response"] == "An edited answer, written by a person." and edited["reviewed"] == "edited"
    assert edited["Question"] == first["Question"] and edited["Complex_CoT"] == first["Complex_CoT"]

    second = read_lines(out)[1]
    choose(page, "md-review-row", re.compile(r"^2\. "))
    wait_text(page, "#md-review-question", re.escape(second["Question"][:40]))
    page.locator("#md-drop").click()
    wait_text(page, "#md-review-status", r"3 rows .*dropped 1")
    assert second["id"] not in {r["id"] for r in read_lines(out)}
    assert read_lines(log)[-1] == {"question": second["id"], "chunk": second["chunk"], "kept": False,
                                   "reason": "dropped in review"}
    third = read_lines(held_out)[0]  # the row that took the dropped one's place: the first held-out row
    wait_text(page, "#md-review-question", re.escape(third["Question"][:40]))
    assert "[eval]" in page.locator("#md-review-row input").input_value()
    page.locator("#md-accept").click()
    wait_text(page, "#md-review-status", r"accepted 1")
    assert next(r for r in read_lines(held_out) if r["id"] == third["id"])["reviewed"] == "accepted"
    assert (len(read_lines(out)), len(read_lines(held_out))) == (1, 2)
    shoot(page, "make-data-review")

    lap("use")
    # ---- use these rows: the data fields of Model & data (the held-out file as data.eval_source)
    page.locator("#md-use-rows").click()
    page.wait_for_function("document.querySelector('#key-data-source textarea, #key-data-source input')"
                           ".value === 'data/rows.jsonl'", timeout=30_000)
    assert page.locator("#preset").is_visible(), "the Model & data screen is shown"
    tab(page, "Settings")
    page.locator("#advanced").get_by_text("Advanced").first.click()  # data.eval_source is an advanced key
    page.wait_for_function("document.querySelector('#key-data-eval_source textarea, #key-data-eval_source input')"
                           "?.value === 'data/rows.eval.jsonl'", timeout=30_000)

    lap("key")
    # ---- the key is in no file of the workspace (nor the studio's own log)
    files = [p for p in root.rglob("*") if p.is_file()] + [studio.log]
    assert len(files) > 10
    assert [str(p) for p in files if key.encode() in p.read_bytes()] == []
    assert key not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")

    lap("unreachable")
    # ---- an unreachable teacher: the CLI's message under the URL field, and the way to start one
    tab(page, "Make data")
    text_box(page, "md-url").fill(f"http://127.0.0.1:{free_port()}/v1")
    page.locator("#md-start").click()
    message = field_error(page, "url", r"No OpenAI-compatible server answers at", 120)
    assert "ollama serve" in message and "Traceback" not in message
    assert marked(page) == ["md-url-error"], "only the URL field is marked"
    assert (len(read_lines(out)), len(read_lines(held_out))) == (1, 2), "the failed start changed no row"
    assert [url for url in page.requests if not url.startswith(("http://127.0.0.1", "data:", "blob:"))] == []
    assert json.loads((root / "data" / "rows.job" / views.COMMAND_FILE).read_text())["args"][0] == "make-data"
    assert os.environ.get("OPENAI_API_KEY") != key

    # ---- the screen in Chinese
    page.get_by_text("中文").click()
    page.get_by_role("tab", name="0 · 用文档制作数据").wait_for()
    wait_text(page, "#md-preview", r"^预览文本块（试运行：不发送任何内容）$", 30)
    assert "教师模型" in page.locator("#md-url").inner_text()
    page.get_by_text("English").click()
    page.get_by_role("tab", name="0 · Make data from documents").wait_for()
    lap("end")
    print("the screen's test: each part began this many seconds after the studio was up:", ", ".join(laps))
