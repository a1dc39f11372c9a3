"""GRPO end to end, for real (TRL's GRPOTrainer, 4-bit NF4 through bitsandbytes, LoRA), on tiny models built from a
config, by the command a user types: the reward rises on a task the model can learn, a resumed run repeats the
uninterrupted one, the demo recipe finishes, and a run can start from an SFT run's adapter."""

from __future__ import annotations

import json
import time

import pytest
from conftest import REPO, run_cli

TARGET_IDS = 64
"""The learnable task: the reward is the share of completion tokens whose id is below this (about 11% of the tiny
vocabulary at random, so every group of completions holds a signal from the first step)."""

REWARD_FILE = f"""
def low_ids(completion_ids, **kwargs):
    \"\"\"The share of the completion's tokens whose id is below {TARGET_IDS}.\"\"\"
    return [sum(i < {TARGET_IDS} for i in ids) / max(len(ids), 1) for ids in completion_ids]
"""

STEPS = 24
MARGIN = 0.4
"""The mean reward of the last 3 steps must exceed that of the first 3 by this much (measured: ~0.11 -> ~0.84)."""


@pytest.fixture(scope="module")
def learnable_model(tmp_path_factory, demo_tokenizer):
    """The demo's 2-layer Qwen2 with a larger initializer range: its frozen random output head then has logits spread
    enough that LoRA on the layers can move the policy far within a few steps (at 0.1 the head caps the share near
    0.3)."""
    from qlora_kit.demo.build import tiny_qwen2_config

    folder = tmp_path_factory.mktemp("learnable-qwen2")
    config = tiny_qwen2_config(len(demo_tokenizer), bos_token_id=demo_tokenizer.bos_token_id,
                               eos_token_id=demo_tokenizer.eos_token_id, pad_token_id=demo_tokenizer.pad_token_id)
    config.initializer_range = 0.2
    config.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


def learnable_recipe(folder, model, out, **changes) -> str:
    (folder / "reward.py").write_text(REWARD_FILE, encoding="utf-8")
    keys = {"steps": STEPS, "save_steps": 0, **changes}
    text = f"""
[model]
name = "{model}"
init = "random"
[lora]
r = 8
alpha = 16
dropout = 0.0
[data]
source = "{REPO / 'qlora_kit' / 'demo' / 'grpo.jsonl'}"
max_length = 256
eval_rows = 4
[train]
method = "grpo"
max_steps = {keys['steps']}
batch_size = 16
grad_accum = 1
learning_rate = 3e-2
lr_scheduler = "constant"
warmup = 0.0
save_steps = {keys['save_steps']}
[grpo]
num_generations = 8
max_completion_length = 8
rewards = {{ format = 0.0, "reward.py:low_ids" = 1.0 }}
[output]
dir = "{out}"
[samples]
greedy = true
"""
    path = folder / "learnable.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def rewards_by_step(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r["reward"] for r in records if "reward" in r}


@pytest.fixture(scope="module")
def learned(tmp_path_factory, learnable_model):
    folder = tmp_path_factory.mktemp("learnable")
    out = folder / "run"
    result = run_cli(learnable_recipe(folder, learnable_model, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "stdout": result.stdout}


def test_the_reward_rises_on_a_learnable_task(learned):
    rewards = rewards_by_step(learned["out"])
    assert sorted(rewards) == list(range(1, STEPS + 1))
    first = sum(rewards[s] for s in (1, 2, 3)) / 3
    last = sum(rewards[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last > first + MARGIN, f"reward {first:.3f} -> {last:.3f} in {STEPS} steps"


def test_the_run_directory_of_a_grpo_run(learned):
    out = learned["out"]
    for name in ("adapter/adapter_config.json", "recipe.toml", "metrics.jsonl", "summary.json", "reward_curve.png",
                 "loss_curve.png", "samples.md", "report.md"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    record = [r for r in records if "reward" in r][-1]
    for key in ("reward", "reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "completions/mean_length",
                "completions/clipped_ratio", "num_tokens", "ram_peak_gib"):
        assert key in record, key
    assert "kl" not in record  # beta = 0: no reference model, no KL
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["method"] == "grpo" and summary["judged_rows"] == 4
    assert summary["train_reward_last"] > summary["train_reward_first"]
    for side in ("base", "fine_tuned"):
        assert 0 <= summary[f"judged_format_{side}"] <= 1 and f"judged_mean_reward_{side}" in summary
    samples = (out / "samples.md").read_text(encoding="utf-8")
    assert samples.count("### Base (adapter disabled)") == 4 and "low_ids" in samples
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Reward (GRPO)" in report and "reward_curve.png" in report and "- judged: mean reward" in report
    assert "reward" in learned["stdout"] and "low_ids" in learned["stdout"]


TOLERANCE = 1e-6


def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path, learnable_model):
    """Stopped at step 6 (a real torch.OutOfMemoryError injected there: the checkpoint is saved at step 5) and
    resumed by the same command: every step's reward equals the uninterrupted run's within TOLERANCE."""
    from qlora_kit.errors import EXIT_OUT_OF_MEMORY
    from qlora_kit.train.interrupts import FAULT_OOM_ENV

    whole = tmp_path / "whole"
    assert run_cli(learnable_recipe(tmp_path, learnable_model, whole, steps=8, save_steps=4)).returncode == 0
    parts = tmp_path / "parts"
    recipe = learnable_recipe(tmp_path, learnable_model, parts, steps=8, save_steps=4)
    stopped = run_cli(recipe, env={FAULT_OOM_ENV: "6"})
    assert stopped.returncode == EXIT_OUT_OF_MEMORY, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert (parts / "checkpoints" / "checkpoint-5").is_dir()
    resumed = run_cli(recipe)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    expected, got = rewards_by_step(whole), rewards_by_step(parts)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=TOLERANCE), step


def test_the_demo_grpo_recipe_runs_from_its_command(tmp_path):
    """recipes/demo_grpo.toml, as its header says to run it (CI runs the same)."""
    out = tmp_path / "demo_grpo"
    result = run_cli("recipes/demo_grpo.toml", f"output.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 24 and summary["judged_rows"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    length = [r["rewards/length/mean"] for r in records if "rewards/length/mean" in r]
    assert sum(length[-3:]) / 3 > sum(length[:3]) / 3 + 0.3  # what a random network can learn: to stop early
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "reward_curve.png").is_file()


def test_grpo_starts_from_an_sft_runs_adapter(tmp_path):
    """model.adapter = an SFT run: its adapter is loaded and trained further (its weights, not a fresh adapter)."""
    from safetensors.torch import load_file

    sft = tmp_path / "sft"
    result = run_cli("recipes/demo.toml", f"output.dir={sft}", "train.max_steps=3", "data.eval_rows=0",
                     "samples.count=0", "train.eval_steps=0")
    assert result.returncode == 0, result.stderr[-2000:]
    grpo = tmp_path / "grpo"
    result = run_cli("recipes/demo_grpo.toml", f"output.dir={grpo}", f"model.adapter={sft}", "train.max_steps=2",
                     "train.learning_rate=1e-9", "data.eval_rows=0", "samples.count=1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"GRPO from the adapter of {sft}" in " ".join(result.stdout.split())
    before, after = load_file(sft / "adapter" / "adapter_model.safetensors"), \
        load_file(grpo / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    key = next(k for k in before if "lora_B" in k)
    assert before[key].abs().max() > 0  # SFT trained it; a fresh adapter's B would be zero
    assert (before[key].float() - after[key].float()).abs().max() < 1e-4


def test_a_missing_adapter_is_refused_before_training(tmp_path):
    result = run_cli("recipes/demo_grpo.toml", f"output.dir={tmp_path / 'r'}", f"model.adapter={tmp_path / 'none'}")
    assert result.returncode == 2
    assert "no adapter there" in result.stdout + result.stderr


def test_a_kl_penalty_is_logged_and_its_reference_is_not_saved(tmp_path):
    """grpo.beta > 0: TRL keeps a frozen copy of the adapter as the reference; the KL is logged, and only the trained
    adapter is saved."""
    out = tmp_path / "kl"
    result = run_cli("recipes/demo_grpo.toml", f"output.dir={out}", "grpo.beta=0.04", "train.max_steps=2",
                     "data.eval_rows=0", "samples.count=0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("kl" in r for r in records)
    assert "kl " in result.stdout
    assert sorted(p.name for p in (out / "adapter").iterdir() if p.is_dir()) == []


def test_ctrl_c_stops_a_grpo_run_with_a_checkpoint_and_the_same_command_resumes_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["recipes/demo_grpo.toml", "train.max_steps=5000", "train.save_steps=0", f"output.dir={out}"]
    process = subprocess.Popen([sys.executable, "-m", "qlora_kit.run", *args], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "finishing this step and saving a checkpoint" in stdout and "Resume with:" in stdout
    checkpoints = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and not (out / "summary.json").exists()
    step = int(checkpoints[0].name.split("-")[1])
    resumed = run_cli(*args[:-2], "train.save_steps=0", f"output.dir={out}", f"train.max_steps={step + 2}",
                      "data.eval_rows=8")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from step {step}" in resumed.stdout
    assert sorted(rewards_by_step(out)) == list(range(1, step + 3))
