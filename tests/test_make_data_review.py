# ruff: noqa: F811 (the fixtures imported from studio_fixtures are parameters of the tests below)
"""make_data/review.py on a real job: `qlora-kit make-data` run once against the tests' own OpenAI-compatible teacher
(tests/teacher_server.py), with the demo's tokenizer, then each test reviews a copy of what it wrote. The drop is
checked the way it matters: the same command run again asks the teacher nothing and counts the row as dropped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from studio_fixtures import teacher  # noqa: F401 (fixture)

from qlora_kit.errors import UserError
from qlora_kit.make_data import review
from qlora_kit.make_data.job import read_lines

pytestmark = pytest.mark.slow  # `qlora-kit make-data` in fresh processes, twice

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


def make_data(folder: Path, documents: Path, url: str) -> subprocess.CompletedProcess:
    # The documents by absolute path, outside the job's folder: the job (which keeps its sources' absolute paths in
    # its settings) is then the same job in each test's copy of that folder.
    return subprocess.run([sys.executable, "-m", "qlora_kit", "make-data", str(documents / "hepatitis.md"),
                           str(documents / "pressure.html"), "--out", "data/rows.jsonl", "--base-url", url,
                           "--model", "test-teacher", "--tokenizer", str(DEMO_TOKENIZER)], cwd=folder,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def made(teacher, tmp_path_factory):
    """A finished job (rows in both files), its documents and the teacher it used."""
    server = teacher("good")
    documents, folder = tmp_path_factory.mktemp("documents"), tmp_path_factory.mktemp("made")
    (documents / "hepatitis.md").write_text(HEPATITIS, encoding="utf-8")
    (documents / "pressure.html").write_text(PRESSURE, encoding="utf-8")
    done = make_data(folder, documents, server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, documents, server


@pytest.fixture
def job(made, tmp_path):
    """A copy of the finished job for one test: (its folder, the documents, the teacher)."""
    folder, documents, server = made
    copy = tmp_path / "job"
    shutil.copytree(folder, copy)
    return copy, documents, server


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_every_row_comes_with_the_chunk_it_was_made_from(job):
    folder, *_ = job
    out = folder / "data" / "rows.jsonl"
    found = review.rows(out)
    train = [r for r in found if r.split == "train"]
    held_out = [r for r in found if r.split == "eval"]
    assert len(train) == len(read_lines(out)) and len(held_out) == len(read_lines(folder / "data/rows.eval.jsonl"))
    assert train and held_out, "two documents: one of them is held out"
    for item in found:
        assert item.chunk["id"] == item.row["chunk"] and item.chunk["split"] == item.split
        assert item.chunk["source"] == item.row["source"]
        # The teacher of the tests asks about the chunk's own sentences: the row's question is in its text.
        assert item.row["Question"].removeprefix("What follows from: ").rstrip("?")[:30] in \
            " ".join(item.chunk["text"].split())


def test_accept_marks_the_row_and_leaves_every_other_line_as_it_was(job):
    folder, *_ = job
    out = folder / "data" / "rows.jsonl"
    before = lines(out)
    first = json.loads(before[0])
    review.accept(out, first["id"])
    after = lines(out)
    assert after[1:] == before[1:]
    assert json.loads(after[0]) == {**first, "reviewed": "accepted"}
    assert read_lines(folder / "data/rows.job/log.jsonl")[-1] == {"question": first["id"], "chunk": first["chunk"],
                                                                  "kept": True, "review": "accepted"}
    assert not list((folder / "data").glob(".*.tmp")), "no temporary file left behind"


def test_edit_rewrites_the_row_in_its_file_with_the_same_id_and_logs_the_teachers_text(job):
    folder, *_ = job
    out = folder / "data" / "rows.eval.jsonl"  # a held-out row: edited in its own file
    before = lines(out)
    row = json.loads(before[1])
    edited = review.edit(folder / "data" / "rows.jsonl", row["id"], " Why is screening of blood done? ",
                         "Screening finds infected blood.", "It lowers the risk of transmission.")
    after = [json.loads(line) for line in lines(out)]
    assert [r["id"] for r in after] == [json.loads(line)["id"] for line in before], "same rows, same order"
    assert after[1] == edited == {**row, "Question": "Why is screening of blood done?",
                                  "Complex_CoT": "Screening finds infected blood.",
                                  "Response": "It lowers the risk of transmission.", "reviewed": "edited"}
    entry = read_lines(folder / "data/rows.job/log.jsonl")[-1]
    assert entry["review"] == "edited" and entry["question"] == row["id"]
    assert entry["before"] == {name: row[name] for name in ("Question", "Complex_CoT", "Response")}


def test_an_edit_that_leaves_a_field_empty_or_puts_think_tags_in_the_answer_is_refused(job):
    folder, *_ = job
    out = folder / "data" / "rows.jsonl"
    row = read_lines(out)[0]
    before = out.read_bytes()
    with pytest.raises(UserError, match="Complex_CoT would be empty"):
        review.edit(out, row["id"], "A question?", "  ", "An answer.")
    with pytest.raises(UserError, match="Response holds a <think> tag"):
        review.edit(out, row["id"], "A question?", "reasoning", "<think>x</think> An answer.")
    with pytest.raises(UserError, match="No row 0123456789ab"):
        review.drop(out, "0123456789ab")
    assert out.read_bytes() == before


def test_a_dropped_row_is_gone_and_the_resumed_job_neither_asks_it_again_nor_keeps_it(job):
    folder, documents, server = job
    out = folder / "data" / "rows.jsonl"
    rows_before = read_lines(out)
    dropped = rows_before[0]
    review.drop(out, dropped["id"])
    assert [r["id"] for r in read_lines(out)] == [r["id"] for r in rows_before[1:]]
    assert read_lines(folder / "data/rows.job/log.jsonl")[-1] == {
        "question": dropped["id"], "chunk": dropped["chunk"], "kept": False, "reason": "dropped in review"}
    assert review.counts(out)["dropped"] == 1

    asked = len(server.asked())
    again = make_data(folder, documents, server.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(server.asked()) == asked, "the resumed job sent no request: nothing was left to ask"
    assert dropped["id"] not in {r["id"] for r in read_lines(out)}
    summary = json.loads((folder / "data/rows.job/summary.json").read_text(encoding="utf-8"))
    assert summary["rows_train"] == len(rows_before) - 1
    assert summary["refused"] == {"dropped in review": 1}


def test_a_line_cut_short_by_a_kill_is_left_out_of_the_rewritten_file(job):
    folder, *_ = job
    out = folder / "data" / "rows.jsonl"
    whole = lines(out)
    with out.open("a", encoding="utf-8") as f:
        f.write('{"Question": "What is cut')
    review.accept(out, json.loads(whole[-1])["id"])
    after = lines(out)
    assert after[:-1] == whole[:-1] and json.loads(after[-1])["reviewed"] == "accepted"
    assert len(after) == len(whole)


def test_counts_say_what_the_review_did(job):
    folder, *_ = job
    out = folder / "data" / "rows.jsonl"
    ids = [r.row["id"] for r in review.rows(out)]
    review.accept(out, ids[0])
    review.edit(out, ids[1], "What is it?", "Because.", "This.")
    assert review.accept(out, ids[1])["reviewed"] == "edited", "accepting an edited row keeps it marked edited"
    review.drop(out, ids[2])
    assert review.counts(out) == {"rows": len(ids) - 1, "accepted": 1, "edited": 1, "dropped": 1}
