"""Data-parallel QLoRA with torchrun on CPU (gloo): 2 processes train like 1 with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

COMMON = ["train.max_steps=6", "train.logging_steps=1", "train.eval_steps=0", "data.eval_rows=0",
          "data.shuffle=false", "train.save_steps=0", "lora.dropout=0.0", "train.grad_accum=1", "samples.count=0"]

# Each test starts fresh training processes (15-50 s each): the quick subset (-m 'not slow') leaves them out.
pytestmark = pytest.mark.slow


DEMO = str(REPO / "recipes" / "demo.toml")


def torchrun(*args, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora_kit.run", DEMO,
               *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    single = run_cli(DEMO, *COMMON, "train.batch_size=4", f"output.dir={root / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    # Rank 0 also writes the end-of-run samples while the other rank is done: that must not hang.
    double = torchrun(*COMMON, "train.batch_size=2", "samples.count=1", "samples.max_new_tokens=8",
                      f"output.dir={root / 'double'}")
    assert double.returncode == 0, double.stderr[-3000:]
    return root, double


def test_two_processes_match_one_with_the_same_global_batch(runs):
    root, _ = runs
    one, two = losses(root / "single"), losses(root / "double")
    assert len(one) == len(two) == 6
    # Same rows in each global batch (sequential order); only float reduction order differs.
    assert two == pytest.approx(one, abs=1e-4)


def test_only_rank_zero_writes_and_speaks(runs):
    root, result = runs
    summary = json.loads((root / "double" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert (root / "double" / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "double" / "samples.md").is_file() and (root / "double" / "report.md").is_file()
    assert result.stdout.count("base vs fine-tuned, 1 ") == 1
    assert result.stdout.count("run summary") == 1 and result.stdout.count("everything else: the defaults") == 1
    assert "2 processes, global batch 4" in result.stdout


def test_multi_process_oom_checkpoint_and_resume(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "resumed"
    crashed = torchrun(*COMMON, "train.batch_size=2", f"output.dir={out}", env={"QLORA_KIT_FAULT_OOM_AT_STEP": "4"})
    assert crashed.returncode != 0 and "Saved a checkpoint at step 3" in crashed.stderr
    resumed = torchrun(*COMMON, "train.batch_size=2", f"output.dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stdout
    assert losses(out) == pytest.approx(losses(root / "double"), abs=1e-5)
    shutil.rmtree(out)


def adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_fsdp_two_processes_shard_train_like_one_and_save_the_whole_adapter(runs, tmp_path):
    """FSDP-QLoRA (distributed.fsdp) over gloo: the 4-bit weights and the adapter are sharded over two
    processes, the losses equal the single-process run's, and the gathered adapter is the same adapter
    (it once came out empty: FSDP's checkpoint wrappers hid the LoRA layers from peft)."""
    root, _ = runs
    out = tmp_path / "fsdp"
    result = torchrun(*COMMON, "train.batch_size=2", "distributed.fsdp=true", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding: FSDP2 over 2 processes" in result.stdout
    assert losses(out) == pytest.approx(losses(root / "single"), abs=1e-4)
    sharded, single = adapter_tensors(out), adapter_tensors(root / "single")
    assert sharded.keys() == single.keys() and len(single) > 0
    for name, tensor in single.items():
        assert sharded[name].shape == tensor.shape
        assert (sharded[name] - tensor).abs().max() < 1e-4, name
