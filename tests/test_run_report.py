"""report.md's own arithmetic and layout, from hand-made metrics (the end-to-end file is checked in
test_pipeline's demo run)."""

from __future__ import annotations

import json

import pytest

from qlora_kit.chat.generate import Reply
from qlora_kit.data.rows import Row
from qlora_kit.results.markdown import table_cell
from qlora_kit.results.report import throughput, write_report
from qlora_kit.results.samples import Sample

RECORDS = [
    {"step": 1, "time_s": 1.0, "num_tokens": 100, "loss": 6.0, "vram_used_gib": 3.0, "vram_peak_gib": 4.0},
    {"step": 2, "time_s": 2.0, "num_tokens": 600, "loss": 5.0, "vram_used_gib": 3.1, "vram_peak_gib": 4.5},
    {"step": 2, "time_s": 2.5, "eval_loss": 5.5, "vram_used_gib": 3.1, "vram_peak_gib": 4.5},
    {"step": 3, "time_s": 4.0, "num_tokens": 1600, "loss": 4.0, "vram_used_gib": 3.2, "vram_peak_gib": 5.25},
]


def test_throughput_is_tokens_over_time_between_logged_steps():
    # Step 2 -> 3 had an evaluation in it (0.5 s of the 2 s): left out, its time is not training.
    assert throughput(RECORDS) == [(2, 500.0)]
    no_eval = [r for r in RECORDS if "eval_loss" not in r]
    assert throughput(no_eval) == [(2, 500.0), (3, 500.0)]
    assert throughput(RECORDS[:1]) == []


def test_table_cells_stay_one_line_and_escape_what_breaks_a_table():
    assert table_cell("a | b\nc\x07") == "a \\| b c\\x07"
    assert table_cell("x" * 500, width=10) == "x" * 9 + "…"


def test_report_from_metrics_and_samples(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    row = Row(question="Is 39 C a fever?", cot="Think.", response="Yes | a fever.", number=7)
    base = Reply(think="", answer="", text="", new_tokens=8, finished=False, closed=False)
    tuned = Reply(think="t", answer="Yes.", text="t</think>Yes.", new_tokens=4, finished=True, closed=True)
    path = write_report(tmp_path, title="m · pretrained", command="python -m qlora_kit.run r.toml",
                        recipe_toml="[train]\nmax_steps = 3\n", data_report=["training on 10 rows"],
                        summary={"steps": 3, "final_eval_loss": None, "tokens_per_s": 400.0},
                        samples=[Sample(row, base, tuned)], planned_reserved_gib=5.775)
    report = path.read_text()
    assert report.startswith("# Run report: m · pretrained\n")
    assert "| steps | 3 |" in report and "| final eval loss | — |" in report
    assert "train loss: 6.0000 at step 1 → 4.0000 at step 3 (3 logged steps)" in report
    assert "eval loss on the held-out rows: 5.5000 (step 2)" in report
    assert "VRAM: peak reserved by the CUDA allocator 5.25 GiB" in report
    assert "planner, before training: 5.78 GiB reserved (+10% of the measured peak)" in report
    assert "median 500 tokens/s" in report
    assert "| reference | Yes \\| a fever. |" in report and "| base | _(no answer)_ |" in report
    assert "| fine-tuned | Yes. |" in report
    assert "```toml\n[train]\nmax_steps = 3\n```" in report
    assert (tmp_path / "memory_speed.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("records", [[], [{"step": 1, "loss": 2.0}]])
def test_report_without_memory_records_has_no_picture(tmp_path, records):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(tmp_path, title="t", command="c", recipe_toml="", data_report=[], summary={},
                          samples=[]).read_text()
    assert "memory_speed.png" not in report and "## Base vs fine-tuned" not in report
    assert not (tmp_path / "memory_speed.png").exists()


def test_a_line_cut_short_is_left_out(tmp_path):
    from qlora_kit.train.artifacts import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + '{"step": 3, "lo')
    assert read_records(path) == RECORDS[:2]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_the_smoothed_loss_does_not_lag_behind_a_falling_loss():
    from qlora_kit.train.artifacts import centered_mean

    falling = [10.0 - 0.05 * i for i in range(100)]
    smoothed = centered_mean(falling)
    assert len(smoothed) == 100
    assert all(abs(s - f) < 1e-9 for s, f in zip(smoothed[5:95], falling[5:95], strict=True))  # on the line
