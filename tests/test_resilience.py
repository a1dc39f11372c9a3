"""Never lose a run: checkpoints, resume that reproduces the uninterrupted curve, Ctrl-C, OOM."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli

DEMO = str(REPO / "recipes" / "demo.toml")
SHORT = ["train.max_steps=12", "train.save_steps=4", "train.logging_steps=1", "train.eval_steps=0",
         "data.eval_rows=0", "samples.count=0"]

# Each test starts fresh training processes (15-50 s each): the quick subset (-m 'not slow') leaves them out.
pytestmark = pytest.mark.slow


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    result = run_cli(DEMO, *SHORT, f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_checkpoints_are_written_and_rotated(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-8"]  # save_total_limit = 2 keeps the newest two
    for name in names:
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= {p.name for p in (uninterrupted / "checkpoints" / name).iterdir()}


def test_out_of_memory_saves_and_resume_reproduces_the_curve(uninterrupted, tmp_path):
    out = tmp_path / "run"
    crashed = run_cli(DEMO, *SHORT, f"output.dir={out}", env={"QLORA_KIT_FAULT_OOM_AT_STEP": "7"})
    assert crashed.returncode == 3
    assert "Out of RAM at step 7" in crashed.stderr and "Saved a checkpoint at step 6" in crashed.stderr
    assert "Traceback" not in crashed.stderr and "lora.r=8" in crashed.stderr
    assert "memory.offload_activations" not in crashed.stderr  # GPU-to-RAM switches: nothing to free on a CPU
    assert (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    assert not (out / "summary.json").exists()

    resumed = run_cli(DEMO, *SHORT, f"output.dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 6" in resumed.stdout
    # Same seed, same data order, same RNG state: on CPU the resumed curve matches the uninterrupted one.
    whole, pieced = losses(uninterrupted), losses(out)
    assert sorted(pieced) == list(range(1, 13))
    for step in whole:
        assert pieced[step] == pytest.approx(whole[step], abs=1e-5), step
    # The summary covers the whole run, both processes: every token, the whole clock, the mean over all 12 steps.
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["num_tokens"] for r in records if "num_tokens" in r}
    assert summary["resumed_from_step"] == 6
    assert tokens[7] > tokens[6] and tokens[12] > tokens[7]  # metrics.jsonl counts over the whole run
    times = [r["time_s"] for r in records]
    assert times == sorted(times)  # and its clock runs on from the checkpoint
    assert summary["wall_time_s"] == round(times[-1], 1)
    # wall_time_s is rounded to 0.1 s: the product may be off by up to 0.05 s worth of tokens.
    trained = summary["tokens_per_s"] * summary["wall_time_s"]
    assert abs(trained - tokens[12]) <= 0.05 * summary["tokens_per_s"] + 1
    whole_summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["mean_train_loss"] == pytest.approx(whole_summary["mean_train_loss"], abs=1e-4)
    assert summary["mean_train_loss"] == pytest.approx(sum(whole.values()) / 12, abs=1e-4)


def test_a_resumed_run_keeps_its_eval_before_training(tmp_path):
    """The "before" is measured once, when the run first starts: a resume neither redoes nor loses it."""
    out = tmp_path / "run"
    with_eval = [*SHORT, "data.eval_rows=8", "train.max_steps=6", f"output.dir={out}"]
    crashed = run_cli(DEMO, *with_eval, env={"QLORA_KIT_FAULT_OOM_AT_STEP": "4"})
    assert crashed.returncode == 3 and "eval loss before training: " in crashed.stdout
    sixteen, before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:2]
    assert sixteen["step"] == before["step"] == 0 and before["time_s"] == 0.0 and "base_16bit_eval_loss" in sixteen

    resumed = run_cli(DEMO, *with_eval)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "eval loss before training" not in resumed.stdout and "16-bit base (what you start from)" not in \
        resumed.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6]
    assert [r["step"] for r in records if "base_16bit_eval_loss" in r] == [0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_before"] == round(sixteen["base_16bit_eval_loss"], 4)
    assert summary["eval_loss_nf4_base"] == round(before["eval_loss"], 4) and summary["final_eval_loss"] is not None
    assert f"eval loss 16-bit base {sixteen['base_16bit_eval_loss']:.4f} → " in resumed.stdout


def test_a_half_written_checkpoint_is_skipped(uninterrupted, tmp_path):
    import shutil

    from qlora_kit.train.checkpoints import latest_valid_checkpoint

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    (out / "checkpoints" / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    path, step = latest_valid_checkpoint(out)
    assert step == 8 and path.name == "checkpoint-8"


def test_changed_recipe_is_refused_on_resume_and_restart_starts_over(tmp_path):
    out = tmp_path / "run"
    crashed = run_cli(DEMO, *SHORT, f"output.dir={out}", env={"QLORA_KIT_FAULT_OOM_AT_STEP": "5"})
    assert crashed.returncode == 3
    changed = run_cli(DEMO, *SHORT, "train.learning_rate=1e-4", f"output.dir={out}")
    assert changed.returncode == 2
    assert "train.learning_rate: 0.003 -> 0.0001" in changed.stderr and "--restart" in changed.stderr
    # Memory settings may change on resume (that is how an OOM is fixed).
    fixed = run_cli(DEMO, *SHORT, "memory.offload_activations=true", "train.max_steps=6", f"output.dir={out}")
    assert fixed.returncode == 0 and "resuming from step 4" in fixed.stdout, fixed.stderr[-2000:]
    restarted = run_cli(DEMO, *SHORT, "train.max_steps=3", f"output.dir={out}", "--restart", "--overwrite")
    assert restarted.returncode == 0 and "resuming" not in restarted.stdout
    assert sorted(losses(out)) == [1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "qlora_kit.run", DEMO, "train.max_steps=5000", "train.save_steps=0",
               "train.logging_steps=1", f"output.dir={out}"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "finishing this step and saving a checkpoint" in stdout
    # Off a terminal (this pipe, a log) nothing wraps at 80 columns: the printed command pastes back whole.
    printed = stdout.splitlines()[stdout.splitlines().index(next(x for x in stdout.splitlines()
                                                                 if x.endswith("Resume with:"))) + 1]
    assert printed.strip() == shlex.join(["python", "-m", "qlora_kit.run", *command[3:]]), printed
    checkpoints = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert not (out / "summary.json").exists()
    step = int(checkpoints[0].name.split("-")[1])

    resumed = run_cli(DEMO, "train.max_steps=5000", "train.save_steps=0", "train.logging_steps=1",
                      f"output.dir={out}", f"train.max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {step}" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_resume_in_a_later_epoch_replays_the_length_grouped_order(tmp_path):
    """240 rows at batch 4: epoch 2 starts at step 61. transformers' own length-grouped sampler shuffles with the
    global RNG, so a run resumed there trained on other batches (qlora_kit.train.batch_order); ours replays them."""
    later = [*SHORT, "train.max_steps=70"]
    whole = run_cli(DEMO, *later, f"output.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "resumed"
    crashed = run_cli(DEMO, *later, f"output.dir={out}", env={"QLORA_KIT_FAULT_OOM_AT_STEP": "65"})
    assert crashed.returncode == 3 and "Saved a checkpoint at step 64" in crashed.stderr
    resumed = run_cli(DEMO, *later, f"output.dir={out}")
    assert resumed.returncode == 0 and "resuming from step 64" in resumed.stdout, resumed.stderr[-2000:]
    expected, got = losses(tmp_path / "whole"), losses(out)
    assert sorted(got) == list(range(1, 71))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_an_interrupted_overwrite_resumes_instead_of_starting_over(tmp_path):
    out = tmp_path / "run"
    assert run_cli(DEMO, *SHORT, "train.max_steps=4", f"output.dir={out}").returncode == 0
    (out / "notes.txt").write_text("mine")  # not ours: --overwrite must leave it alone
    crashed = run_cli(DEMO, *SHORT, f"output.dir={out}", "--overwrite", env={"QLORA_KIT_FAULT_OOM_AT_STEP": "6"})
    assert crashed.returncode == 3 and "Saved a checkpoint at step 5" in crashed.stderr
    # The old run's files are gone, so the directory is an unfinished run: re-running resumes it.
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert (out / "notes.txt").read_text() == "mine"
    resumed = run_cli(DEMO, *SHORT, f"output.dir={out}")
    assert resumed.returncode == 0 and "resuming from step 5" in resumed.stdout, resumed.stderr[-2000:]
    assert sorted(losses(out)) == list(range(1, 13))
