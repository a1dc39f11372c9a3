"""The CPU plan (qlora_kit.plan.cpu, qlora_kit.plan.cpu_time): RAM terms as a CPU run holds them, gradient
checkpointing as the run decides it, the live tensors of real CPU steps with checkpointing off, a real run's peak RAM,
the time estimate's measured rate, and `python -m qlora_kit.plan` on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import sys

import pytest
import torch
from conftest import REPO, run_cli

from qlora_kit.plan.cpu import ACTIVATIONS_OFF, ACTIVATIONS_ON, KEPT, checkpointing_choice, make_cpu_plan
from qlora_kit.plan.cpu_time import Rates, measure_rates, time_estimate
from qlora_kit.plan.estimate import GIB, Architecture, estimate, main
from qlora_kit.recipe.loading import recipe_from_dict

# SmolLM2-135M-Instruct's config.json values (recipes/smol_medical.toml's model), so no file is needed.
SMOL = Architecture.from_config({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                 "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                                 "max_position_embeddings": 8192}, "smollm2-135m")
RATES = Rates(matmul_gflops=50.0, memory_gbs=10.0, threads=2, seconds=0.0)
"""Fixed rates: the figures the tests compare must not depend on how busy the machine is."""
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU plan is what a machine without a GPU prints")


def smol_recipe(**train):
    """recipes/smol_medical.toml's settings (without its file: the planner needs none)."""
    return recipe_from_dict({
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "data": {"max_length": 768, "eval_rows": 24},
        "train": {"max_steps": 60, "batch_size": 1, "grad_accum": 4, "eval_steps": 20, **train},
        "samples": {"count": 4, "max_new_tokens": 768}})


def test_checkpointing_off_has_no_checkpointed_activations_and_more_activation_ram():
    roomy = (64 * GIB, 32 * GIB)
    off = make_cpu_plan(SMOL, smol_recipe(gradient_checkpointing=False), rates=RATES, ram=roomy)
    assert not off.checkpointing and off.checkpointing_reason == "off in the recipe"
    assert ACTIVATIONS_OFF in off.terms_gib and ACTIVATIONS_ON not in off.terms_gib

    # Checkpointing on, and too little RAM for the run to turn it off: the checkpointed layer inputs instead.
    need = checkpointing_choice(SMOL, smol_recipe(), 64 * GIB).activations_bytes
    tight = (8 * GIB, 3 * need)  # a quarter of it is less than every layer's activations
    on = make_cpu_plan(SMOL, smol_recipe(gradient_checkpointing=True), rates=RATES, ram=tight)
    assert on.checkpointing and on.checkpointing_reason.startswith("on: ")
    assert ACTIVATIONS_ON in on.terms_gib and ACTIVATIONS_OFF not in on.terms_gib
    assert on.terms_gib[ACTIVATIONS_ON] < off.terms_gib[ACTIVATIONS_OFF] / 10
    assert on.terms_gib[KEPT] < off.terms_gib[KEPT] and on.peak_gib < off.peak_gib
    # Without checkpointing every layer is computed once, with it twice: the estimate takes longer.
    assert on.time.train_flops_per_token > 1.3 * off.time.train_flops_per_token

    # The recipe's default (on) with RAM to spare: the run turns it off, and so does its plan.
    decided = make_cpu_plan(SMOL, smol_recipe(), rates=RATES, ram=roomy)
    assert not decided.checkpointing and decided.checkpointing_reason.startswith("off on this CPU")
    assert decided.terms_gib == off.terms_gib
    # The GPU table names the term as the run has it too.
    assert ACTIVATIONS_OFF in estimate(SMOL, smol_recipe(gradient_checkpointing=False)).terms


def test_the_run_decides_checkpointing_as_its_plan_does():
    from rich.console import Console

    from qlora_kit.train.fit import checkpointing_on_cpu

    recipe = recipe_from_dict({"model": {"name": str(REPO / "qlora_kit" / "demo" / "tiny-qwen2")},
                               "train": {"gradient_checkpointing": True}})
    console = Console(file=io.StringIO(), width=200)
    decided = checkpointing_on_cpu(recipe, console)
    assert decided.train.gradient_checkpointing is False and recipe.train.gradient_checkpointing is True
    assert "gradient checkpointing off on this CPU: every layer's activations" in console.file.getvalue()


def test_the_plan_s_ram_terms_are_the_run_s_weights_and_no_gpu_terms():
    plan = make_cpu_plan(SMOL, smol_recipe(gradient_checkpointing=False), rates=RATES, ram=(64 * GIB, 32 * GIB))
    terms = plan.terms_gib
    assert not any("CUDA" in term or "slack" in term for term in terms)
    assert terms["embeddings + lm_head (float32 on a CPU)"] == round(49152 * 576 * 4 / GIB, 3)  # tied: one matrix
    assert terms["optimizer state (AdamW: two float32 moments)"] == round(2 * terms["LoRA weights (fp32)"], 3)
    assert terms["Python + torch + training libraries (measured)"] > 0.3
    assert plan.peak_gib == pytest.approx(sum(terms.values()), abs=0.01)
    # The moments that could be the peak, each its own figure: the training step's is the largest here.
    assert set(plan.moments_gib) == {"training step (loss tiles (chunked, no full logits))",
                                     "16-bit base evaluation, before the NF4 model loads",
                                     "end-of-run samples (weights dequantized once)"}
    assert plan.peak_moment.startswith("training step") and plan.fits
    small = make_cpu_plan(SMOL, smol_recipe(gradient_checkpointing=False), rates=RATES, ram=(4 * GIB, 2 * GIB))
    assert not small.fits


@pytest.fixture(scope="module")
def cpu_calibration():
    """tools/calibrate_cpu_plan.py as a module: real qlora_kit training steps on CPU with every live tensor counted."""
    spec = importlib.util.spec_from_file_location("calibrate_cpu_plan", REPO / "tools" / "calibrate_cpu_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_the_plan_matches_the_live_tensors_of_real_steps_without_checkpointing(cpu_calibration, dropout):
    """Two real qlora_kit steps (NF4, LoRA r 16, TRL, real arithmetic) with checkpointing off and on, every live
    tensor counted: the planner's live-tensor figure within 5 % of the measured peak (the committed grid fits within
    ±1.3 %), and without checkpointing above the same step with it."""
    shape = ("llama", 384, 256, 768, 3, 4, 2, 2048, dropout)
    measured = {}
    for checkpointing in (False, True):
        folder = cpu_calibration.model_folder(*shape[:1], *shape[2:8])
        recipe = cpu_calibration.shape_recipe(folder, shape[1], dropout, checkpointing)
        counted = cpu_calibration.count_steps(recipe, "float32", no_arithmetic=False)
        planned = estimate(Architecture.from_config(json.loads((folder / "config.json").read_text())), recipe,
                           device="cpu").allocated
        assert planned / counted["peak_bytes"] - 1 == pytest.approx(0, abs=0.05), (checkpointing, counted)
        measured[checkpointing] = counted["peak_bytes"]
    assert measured[False] > measured[True]


def test_the_time_estimate_comes_from_a_measured_positive_rate():
    rates = measure_rates(576, 1536)
    assert all(math.isfinite(v) and v > 0 for v in (rates.matmul_gflops, rates.memory_gbs)) and rates.threads >= 1
    recipe = smol_recipe(gradient_checkpointing=False)
    estimate_now = time_estimate(SMOL, recipe, rates, checkpointing=False, lengths=[600] * 340,
                                 eval_lengths=[650] * 24, sixteen_bit_eval=True)
    parts = (estimate_now.train_s, estimate_now.eval_s, estimate_now.samples_s, estimate_now.total_s)
    assert all(math.isfinite(v) and v > 0 for v in parts)
    assert estimate_now.low_s < estimate_now.total_s < estimate_now.high_s
    # The rows' real lengths when known, else max_length (an upper bound); and what it counts.
    assert estimate_now.train_tokens == 60 * 4 * 600 and "mean length, 600 tokens" in estimate_now.tokens_from
    assumed = time_estimate(SMOL, recipe, RATES, checkpointing=False)
    assert assumed.train_tokens == 60 * 4 * 768 and "an upper bound" in assumed.tokens_from
    assert estimate_now.evaluations == 5  # the 16-bit base, the NF4 base, steps 20, 40 and 60 (the last one)
    assert estimate_now.sample_replies == 8 and estimate_now.sample_tokens == 8 * 768
    longer = time_estimate(SMOL, smol_recipe(gradient_checkpointing=False, max_steps=120), RATES, False, [600] * 340)
    shorter = time_estimate(SMOL, recipe, RATES, False, [600] * 340)
    assert longer.train_s > 1.9 * shorter.train_s
    # Half the rate, twice the seconds of training.
    slower = time_estimate(SMOL, recipe, Rates(25.0, 10.0, 2, 0.0), False, [600] * 340)
    assert slower.train_s > 1.8 * shorter.train_s


@NO_GPU
def test_cli_on_a_cpu_machine_prints_the_cpu_plan_and_a_gpu_table_only_on_request(capsys):
    demo = str(REPO / "recipes" / "demo.toml")
    assert main([demo, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"peak_gib", "terms_gib", "time", "available_ram_gib", "checkpointing_reason"} <= plan.keys()
    assert plan["time"]["train_s"] > 0 and plan["time"]["rates"]["matmul_gflops"] > 0
    assert not any("CUDA" in term for term in plan["terms_gib"])

    assert main([demo]) == 0
    text = capsys.readouterr().out
    assert "RAM plan (this CPU)" in text and "peak RAM of the run" in text and "time: about" in text
    assert "VRAM plan" not in text and "CUDA context" not in text

    assert main([demo, "--gpu", "8"]) == 0
    text = capsys.readouterr().out
    cpu_at, gpu_at = text.index("RAM plan (this CPU)"), text.index("for a 8 GiB GPU (not this machine)")
    assert cpu_at < gpu_at < text.index("VRAM plan: ") and "CUDA context" in text[gpu_at:]


@NO_GPU
def test_a_real_run_s_peak_ram_is_what_its_cpu_plan_said(tmp_path):
    """The demo from the command line: the plan it prints before loading, and summary.json's peak RAM after. The
    tolerance is the planner's over the committed runs (bench/results/cpu-plan-runs.json) plus a margin: the tiny
    model's peak is mostly the libraries."""
    out = tmp_path / "demo"
    result = run_cli(str(REPO / "recipes" / "demo.toml"), "train.max_steps=4", "samples.count=1",
                     "samples.max_new_tokens=8", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory and time plan (this CPU: no GPU here)" in result.stdout and "time: about" in result.stdout
    planned = float(re.search(r"peak RAM of the run\s*│\s*([0-9.]+)", result.stdout).group(1))
    measured = json.loads((out / "summary.json").read_text())["peak_ram_gib"]
    assert measured == pytest.approx(planned, rel=0.15), (planned, measured)
