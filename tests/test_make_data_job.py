"""`qlora-kit make-data` as a user runs it, against a real OpenAI-compatible server process (tests/teacher_server.py:
the tests' own, which answers from the passage it is sent and misbehaves on purpose when asked to): documents to rows
a recipe trains on, kill -9 and resume with every row exactly once, and each failure named, counted and never
reported as success."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from qlora_kit.make_data.teacher import is_local

pytestmark = pytest.mark.slow

TOKENIZER = REPO / "qlora_kit" / "demo" / "tiny-qwen2"
SECRET = "sk-test-never-written-9f3a"
SECTIONS = {
    "Hepatitis B": "Hepatitis B is an infection of the liver caused by the hepatitis B virus. It spreads through blood "
                   "and body fluids, for example from mother to child at birth. A vaccine gives about 95 percent "
                   "protection and is given to infants at birth.",
    "Hepatitis C": "Hepatitis C is caused by the hepatitis C virus and spreads mainly through blood. Direct-acting "
                   "antiviral medicines cure more than 95 percent of infections. There is no vaccine for it yet.",
    "Cirrhosis": "Cirrhosis is scarring of the liver after long injury. Alcohol, hepatitis B and hepatitis C are its "
                 "commonest causes. Its complications include ascites, variceal bleeding and encephalopathy.",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Teacher:
    """tests/teacher_server.py in its own process; `requests()` reads what it was asked."""

    def __init__(self, mode: str, folder: Path):
        self.port, self.log = free_port(), folder / f"teacher-{mode}.jsonl"
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "teacher_server.py"), str(self.port),
                                         mode, str(self.log)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def teacher(tmp_path):
    started = []

    def start(mode: str = "good") -> Teacher:
        started.append(Teacher(mode, tmp_path))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def documents(folder: Path) -> Path:
    """A folder of mixed documents: Markdown, HTML, DOCX (python-docx), Chinese text, plus two that cannot be read."""
    import docx

    folder.mkdir()
    (folder / "liver.md").write_text("".join(f"# {title}\n\n{text}\n\n" for title, text in SECTIONS.items()))
    (folder / "guide.html").write_text(
        "<html><body><nav>Home | Contact</nav><h1>Jaundice</h1><p>Jaundice is yellowing of the skin caused by "
        "bilirubin. It appears when bilirubin rises above about 3 milligrams per decilitre.</p><h2>Causes</h2><p>"
        "Its causes are grouped as before, within and after the liver. Gallstones block the bile duct after the "
        "liver.</p></body></html>")
    manual = docx.Document()
    manual.add_heading("Liver function tests", level=1)
    manual.add_paragraph("Alanine aminotransferase rises when liver cells are injured. Alkaline phosphatase rises "
                         "when the flow of bile is blocked. Albumin falls when the liver fails to make protein.")
    manual.save(folder / "tests.docx")
    (folder / "zh.txt").write_text("# 乙型肝炎\n\n乙型肝炎是由乙型肝炎病毒引起的肝脏感染。它通过血液和体液传播，"
                                   "例如在分娩时由母亲传给孩子。接种疫苗可以提供大约百分之九十五的保护。\n",
                                   encoding="utf-8")
    (folder / "empty.md").write_text("")
    (folder / "slides.pptx").write_bytes(b"PK\x03\x04")
    return folder


def make_data(*args, env: dict | None = None, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qlora_kit.make_data", *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=popen.get("cwd", REPO), env=environment, capture_output=True, text=True,
                          timeout=timeout)


def job_args(source: Path, out: Path, server: Teacher, *extra) -> list:
    return [source, "--out", out, "--base-url", server.url, "--model", "test-teacher", "--tokenizer", TOKENIZER,
            "--chunk-tokens", "96", "--overlap", "24", "--eval-share", "0.3", *extra]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def test_a_folder_of_mixed_documents_becomes_rows_a_recipe_trains_on(tmp_path, teacher):
    server, folder, out = teacher(), documents(tmp_path / "docs"), tmp_path / "data" / "rows.jsonl"
    result = make_data(*job_args(folder, out, server), env={"OPENAI_API_KEY": SECRET})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert "skipped" in text and "empty.md: empty file" in text and "slides.pptx: unsupported type .pptx" in text
    assert "chunks: " in text and "requests: about " in text and "tokens: about " in text  # the plan, before
    train, held_out = rows(out), rows(out.with_name("rows.eval.jsonl"))
    assert train and held_out
    for row in train + held_out:
        assert row["Question"].endswith(("?", "？")) and row["Complex_CoT"] and row["Response"] and row["score"] >= 7
    # Held out by document: no document, and so no chunk, on both sides.
    assert not {r["source"] for r in train} & {r["source"] for r in held_out}
    assert len({r["id"] for r in train + held_out}) == len(train + held_out)
    chinese = [r for r in train + held_out if r["source"].endswith("zh.txt")]
    assert chinese and all(r["Question"].startswith("关于") for r in chinese)  # asked with the Chinese prompts
    summary = json.loads((tmp_path / "data" / "rows.job" / "summary.json").read_text())
    assert (summary["rows_train"], summary["rows_eval"]) == (len(train), len(held_out))
    assert summary["failed_requests"] == {} and summary["chunks_not_asked"] == summary["questions_not_answered"] == 0
    assert f"kept {len(train) + len(held_out)} rows" in text and "per document" in text
    assert "all rows fit max_length = 2048" in text
    # The key went to the server in the request header, and nowhere else.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".docx":
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
    assert SECRET not in result.stdout + result.stderr

    # The rows as a recipe reads them: data.source and data.eval_source, no mapping.
    trained = subprocess.run([sys.executable, "-m", "qlora_kit.run", str(REPO / "recipes" / "demo.toml"),
                              f"data.source={out}", f"data.eval_source={out.with_name('rows.eval.jsonl')}",
                              "data.eval_rows=0", "train.max_steps=2", "train.eval_steps=0", "samples.count=0",
                              f"output.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Every held-out row that fits the demo's max_length is evaluated, and none comes from the training rows.
    assert 0 < run_summary["eval_rows"] <= len(held_out) and 0 < run_summary["train_rows"] <= len(train)
    assert f"eval rows: {run_summary['eval_rows']} from {out.with_name('rows.eval.jsonl')}" in trained.stdout


def test_a_dry_run_shows_chunks_and_prompts_and_sends_nothing(tmp_path, teacher):
    server, folder, out = teacher(), documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    result = make_data(*job_args(folder, out, server), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the prompts for chunk" in result.stdout and "<passage>" in result.stdout and "Score: N" in result.stdout
    assert "dry run:" in result.stdout and server.requests() == [] and not out.exists()
    # Only the preview of the chunks (what the studio shows): no rows, no job started.
    assert [p.name for p in (tmp_path / "rows.job").iterdir()] == ["preview.jsonl"]


def test_kill_9_mid_job_then_the_same_command_keeps_every_row_exactly_once(tmp_path, teacher):
    folder = documents(tmp_path / "docs")
    reference_out, out = tmp_path / "whole" / "rows.jsonl", tmp_path / "killed" / "rows.jsonl"
    reference = teacher()
    whole = make_data(*job_args(folder, reference_out, reference))
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = {r["id"] for r in rows(reference_out) + rows(reference_out.with_name("rows.eval.jsonl"))}

    slow = teacher("slow")  # one second a reply: the kill lands mid-job
    command = [sys.executable, "-m", "qlora_kit.make_data", *map(str, job_args(folder, out, slow, "--concurrency",
                                                                             "2"))]
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(rows(out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = rows(out) + rows(out.with_name("rows.eval.jsonl"))
    assert 2 <= len(before) < len(expected), "the kill landed mid-job"
    asked_before = len(slow.requests())

    resumed = make_data(*job_args(folder, out, slow, "--concurrency", "2"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "continuing the job" in resumed.stdout
    after = rows(out) + rows(out.with_name("rows.eval.jsonl"))
    assert sorted(r["id"] for r in after) == sorted(expected)  # every row exactly once: none lost, none twice
    # Nothing kept was asked again: the resumed run asked only what was not decided (at most the 2 in flight again).
    answered_twice = [q for q, n in count_answers(slow.requests()).items() if n > 1]
    assert len(answered_twice) <= 2, answered_twice
    assert len(slow.requests()) - asked_before < len(reference.requests())  # not the whole job again


def count_answers(requests: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in requests:
        if request["kind"] == "answer":
            counts[request["question"]] = counts.get(request["question"], 0) + 1
    return counts


def test_a_teacher_that_breaks_its_json_is_refused_counted_and_not_called_a_success(tmp_path, teacher):
    server, folder, out = teacher("broken"), documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    result = make_data(*job_args(folder, out, server, "--max-chunks", "2"))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "no row was kept" in result.stdout
    summary = json.loads((tmp_path / "rows.job" / "summary.json").read_text())
    assert summary["refused"] == {"questions: broken JSON": 2}
    # Each chunk was asked once, then once more with what was wrong: then refused, not retried forever.
    asked = server.requests()
    assert len(asked) == 4 and sum(r["retry"] for r in asked) == 2


def test_a_server_that_fails_leaves_the_work_for_the_next_run(tmp_path, teacher):
    folder, out = documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    down = teacher("down")
    result = make_data(*job_args(folder, out, down, "--max-chunks", "2"))
    assert result.returncode == 1 and "incomplete:" in result.stdout, result.stdout[-2000:]
    summary = json.loads((tmp_path / "rows.job" / "summary.json").read_text())
    assert summary["failed_requests"] == {"server error (500)": 2} and summary["chunks_not_asked"] == 2
    assert len(down.requests()) == 2 * 5  # the client's own retries: 4 after the first try, with back-off
    flaky = teacher("flaky")  # every other request a 500: the retries get through
    done = make_data(*job_args(folder, out, flaky, "--max-chunks", "2"))
    assert done.returncode == 0, done.stdout[-2000:]
    assert rows(out) or rows(out.with_name("rows.eval.jsonl"))


def test_a_time_out_is_named(tmp_path, teacher):
    server, folder, out = teacher("stall"), documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    result = make_data(*job_args(folder, out, server, "--max-chunks", "1", "--timeout", "0.5"))
    assert result.returncode == 1
    assert json.loads((tmp_path / "rows.job" / "summary.json").read_text())["failed_requests"] == {"time-out": 1}


@pytest.mark.parametrize(("mode", "model", "expected"), [
    ("locked", "test-teacher", "refused the API key (401)"),
    ("good", "test-teachr", "does not serve the model `test-teachr` (did you mean `test-teacher`?)"),
    (None, "test-teacher", "No OpenAI-compatible server answers at"),
])
def test_a_teacher_that_cannot_be_used_is_one_screen_before_any_work(tmp_path, teacher, mode, model, expected):
    folder, out = documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    url = teacher(mode).url if mode else f"http://127.0.0.1:{free_port()}/v1"
    result = make_data(folder, "--out", out, "--base-url", url, "--model", model, "--tokenizer", TOKENIZER)
    assert result.returncode == 2, result.stdout[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    if mode is None:
        assert "ollama serve" in result.stderr and "llama-server" in result.stderr
    assert not out.exists() and not (tmp_path / "rows.job").exists()


def test_a_job_continued_with_other_settings_is_refused_and_restart_starts_over(tmp_path, teacher):
    server, folder, out = teacher(), documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    assert make_data(*job_args(folder, out, server, "--max-chunks", "1")).returncode == 0
    changed = make_data(*job_args(folder, out, server, "--max-chunks", "1", "--min-score", "9"))
    assert changed.returncode == 2 and "min_score: 7 then, 9 now" in changed.stderr
    restarted = make_data(*job_args(folder, out, server, "--max-chunks", "1", "--min-score", "9", "--restart"))
    assert restarted.returncode == 0 and "continuing" not in restarted.stdout


@pytest.mark.parametrize(("mode", "reasoning_from", "starts"), [
    ("reasoning", "reasoning field", "The question asks"),  # a reasoning model's own chain of thought
    ("plain", "asked after the answer", "The passage states"),  # a teacher that gave none: asked for it after
])
def test_the_reasoning_comes_from_where_the_teacher_gives_it(tmp_path, teacher, mode, reasoning_from, starts):
    server, folder, out = teacher(mode), documents(tmp_path / "docs"), tmp_path / "rows.jsonl"
    assert make_data(*job_args(folder, out, server, "--max-chunks", "2")).returncode == 0
    kept = rows(out) + rows(out.with_name("rows.eval.jsonl"))
    assert kept and {r["reasoning_from"] for r in kept} == {reasoning_from}
    assert all(r["Complex_CoT"].startswith(starts) for r in kept)


def test_only_a_loopback_teacher_keeps_the_documents_on_this_machine():
    assert all(map(is_local, ["http://127.0.0.1:11434/v1", "http://localhost:8080/v1", "http://[::1]:8000/v1"]))
    assert not any(map(is_local, ["http://192.168.1.5:11434/v1", "https://api.deepseek.com/v1"]))
