"""The live status: plain lines when not a terminal, a rich panel with a memory bar on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_kit.train.status import StatusCallback


def drive(callback: StatusCallback, logs: list[dict]) -> TrainerState:
    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=10)
    callback.on_train_begin(args, state, control)
    for step, entry in enumerate(logs, start=1):
        state.global_step = step
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs=entry)
    callback.on_train_end(args, state, control)
    return state


LOGS = [{"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5, "num_tokens": 100.0},
        {"loss": 1.0, "learning_rate": 2e-4, "grad_norm": 0.25, "num_tokens": 300.0},
        {"eval_loss": 1.5}]


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    callback = StatusCallback("title", Console(file=out, width=200), live=False)
    drive(callback, LOGS)
    title, *lines = out.getvalue().splitlines()
    assert title == "training: title"
    assert len(lines) == 3  # one per log, no live panel
    assert lines[0].startswith("step 1/10 | loss 2.0000 (smoothed 2.0000) | lr 1.00e-04 | gnorm 0.500")
    assert "loss 1.0000 (smoothed 1.9000)" in lines[1]  # smoothed: 0.9 * 2.0 + 0.1 * 1.0
    assert "tok/s" in lines[1] and "RAM" in lines[1] and "eta" in lines[1]
    assert lines[2] == "step 3/10 | eval loss 1.5000"


def test_live_panel_shows_progress_loss_and_memory():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    callback = StatusCallback("qlora_kit · tiny", console, live=True)
    state = drive(callback, LOGS)
    frame = Console(file=io.StringIO(), width=100, record=True, color_system=None)
    frame.print(callback.render(state))
    text = frame.export_text()
    for expected in ("qlora_kit · tiny", "3/10", "smoothed 1.9000", "eval loss", "1.5000", "grad norm",
                     "tokens/s", "RAM", "GiB used, peak"):
        assert expected in text, expected
