"""Measure what the CPU plan (qlora_kit/plan/cpu.py) needs, and how far it is from real runs.

    python tools/calibrate_cpu_plan.py tensors [--out bench/results/cpu-plan-tensors.json] [--fit]
    python tools/calibrate_cpu_plan.py baseline
    python tools/calibrate_cpu_plan.py runs [--out bench/results/cpu-plan-runs.json] [--rounds 2] [--fit]
    python tools/calibrate_cpu_plan.py runs --from bench/results/cpu-plan-runs.json --fit   # re-derive, no run

`tensors`: the live tensors (qlora_kit.plan.tensor_peak) of real qlora_kit training steps on CPU (random weights,
real NF4, LoRA r 16 on all linear layers, TRL, two steps at batch 1) with gradient checkpointing off and on, at
each shape of a small grid, in float32 (a CPU run) and under bfloat16 autocast (a GPU run, counted on a CPU).
Without checkpointing autograd keeps every layer's saved tensors until the backward reaches it; the difference
between the two runs at the same shape (the loss tiles cancel) is that, per layer. `--fit` prints the per-token
coefficients (the saved_* fields of qlora_kit.plan.peak.PROFILES).

`baseline`: the resident memory of a fresh interpreter that imported what a run imports (torch, transformers, TRL,
peft, bitsandbytes, datasets): qlora_kit.plan.cpu.LIBRARIES_GIB.

`runs`: `python -m qlora_kit.run` as a user runs it, on the embedded demo and on short SmolLM2-135M runs (the real
GGUF base, medical-o1 rows from the fixtures), each in its own process; beside each, the CPU plan of the same
recipe with this CPU's rates measured just before (qlora_kit.plan.cpu.measure_rates). Recorded: the process's
peak RSS (wait4's ru_maxrss, the whole run), the summary's peak RAM and tokens/s, the seconds spent training,
evaluating and writing samples, and what the plan said. `--fit` derives the time model's constants
(qlora_kit.plan.cpu.SPEED) from them. The machine's load average is recorded beside every run: on a CPU shared
with other programs every figure moves, so prefer --rounds 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO_TOKENIZER = REPO / "qlora_kit" / "demo" / "tiny-qwen2"
FIXTURE_ROWS = REPO.parent / "shared" / "fixtures" / "medical_o1_en.jsonl"
MIB, GIB = 1024**2, 1024**3

# family, tokens, hidden, intermediate, layers, heads, kv heads, vocab, dropout: varied one at a time around a small
# core, SmolLM2-135M's layer (hidden 576, 9/3 heads of 64) and the 1.5B's (Qwen2: q/k/v biases) among them.
SHAPES = [
    ("llama", 512, 512, 1536, 2, 8, 2, 1024, 0.0), ("llama", 256, 512, 1536, 2, 8, 2, 1024, 0.0),
    ("llama", 1024, 512, 1536, 2, 8, 2, 1024, 0.0), ("llama", 2048, 512, 1536, 2, 8, 2, 1024, 0.0),
    ("llama", 512, 512, 1536, 1, 8, 2, 1024, 0.0), ("llama", 512, 512, 1536, 4, 8, 2, 1024, 0.0),
    ("llama", 512, 1024, 1536, 2, 16, 4, 1024, 0.0), ("llama", 512, 512, 4096, 2, 8, 2, 1024, 0.0),
    ("llama", 512, 512, 1536, 2, 8, 8, 1024, 0.0), ("llama", 768, 576, 1536, 2, 9, 3, 1024, 0.0),
    ("qwen2", 512, 1536, 8960, 1, 12, 2, 1024, 0.0), ("qwen2", 1024, 512, 1536, 2, 8, 2, 1024, 0.0),
    ("llama", 512, 512, 1536, 2, 8, 2, 1024, 0.05), ("llama", 768, 576, 1536, 2, 9, 3, 1024, 0.05),
]
QUICK = [("llama", 512, 512, 1536, 2, 8, 2, 1024, 0.0)]
NO_ARITHMETIC_MIN_ELEMENTS = 65536  # as tools/bench.py --count: big elementwise ops allocated, not computed


# ----------------------------------------------------------------------------------------------------- tensors


def model_folder(family: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int) -> Path:
    """A config-only model folder of this shape (init = "random" builds its weights, as the demo does)."""
    from transformers import LlamaConfig, Qwen2Config

    folder = Path(tempfile.mkdtemp(prefix="qlora_kit-cpu-plan-"))
    config = (LlamaConfig if family == "llama" else Qwen2Config)(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=False,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.save_pretrained(folder)
    return folder


def shape_recipe(folder: Path, tokens: int, dropout: float, checkpointing: bool, steps: int = 2):
    from qlora_kit.recipe.loading import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": str(folder), "init": "random", "tokenizer": str(DEMO_TOKENIZER)},
        "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
        "data": {"source": "synthetic", "max_length": tokens},
        "train": {"max_steps": steps, "batch_size": 1, "grad_accum": 1, "save_steps": 0, "logging_steps": 1,
                  "gradient_checkpointing": checkpointing}}, where="calibration recipe")


def count_steps(recipe, dtype: str, no_arithmetic: bool = True) -> dict:
    """Two real qlora_kit training steps of `recipe`, every live tensor counted."""
    import torch

    from qlora_kit.data.encode import Example, to_dataset
    from qlora_kit.model.loading import Precision, add_lora, choose_precision, load_model, load_tokenizer
    from qlora_kit.plan.tensor_peak import LiveTensorBytes, NoArithmetic, loss_phases
    from qlora_kit.train.fit import build_trainer

    precision = Precision("cpu", torch.bfloat16) if dtype == "bfloat16" else choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)
    tokens, vocab = recipe.data.max_length, model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, vocab, (tokens,), generator=generator).tolist(),
                        [0] * 16 + [1] * (tokens - 16), row) for row in range(recipe.train.max_steps)]
    with tempfile.TemporaryDirectory(prefix="qlora_kit-cpu-plan-") as out:
        trainer = build_trainer(recipe, model, load_tokenizer(recipe.model), to_dataset(examples), None, precision,
                                Path(out), [])
        gc.collect()
        counter = LiveTensorBytes("cpu", trainer.model)
        skipping = NoArithmetic(NO_ARITHMETIC_MIN_ELEMENTS) if no_arithmetic else contextlib.nullcontext()
        with loss_phases(counter), counter, skipping:
            trainer.train()
        lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer, model
    gc.collect()
    return {"start_bytes": counter.start_bytes, "peak_bytes": counter.peak_bytes,
            "phase_peaks": dict(counter.phase_peaks), "lora_params": lora}


def measure_shape(shape: tuple, dtype: str) -> dict:
    family, tokens, hidden, intermediate, layers, heads, kv_heads, vocab, dropout = shape
    folder = model_folder(family, hidden, intermediate, layers, heads, kv_heads, vocab)
    started = time.monotonic()
    result = {"shape": list(shape), "dtype": dtype}
    for checkpointing in (False, True):
        result["checkpointing_on" if checkpointing else "checkpointing_off"] = count_steps(
            shape_recipe(folder, tokens, dropout, checkpointing), dtype)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def planned_tensors(measurement: dict, checkpointing: bool):
    """The planner's live-tensor estimate (what a GPU's allocator or the counter sees) at a measured shape."""
    from qlora_kit.plan.peak import Architecture, estimate

    family, tokens, hidden, intermediate, layers, heads, kv_heads, vocab, dropout = measurement["shape"]
    folder = model_folder(family, hidden, intermediate, layers, heads, kv_heads, vocab)
    arch = Architecture.from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    return estimate(arch, shape_recipe(folder, tokens, dropout, checkpointing), device="cpu",
                    compute_dtype=measurement["dtype"])


def fit_saved(measurements: list[dict]) -> dict:
    """Per dtype: the per-token coefficients (x hidden, x intermediate, x kv width, + dropout x hidden) of what
    autograd saves per layer, in compute-dtype elements, from (peak of the loss backward without checkpointing -
    the same with it) / layers + the layer input that checkpointing keeps; least squares of the relative error."""
    import numpy as np

    fitted = {}
    for dtype in ("float32", "bfloat16"):
        c = 4 if dtype == "float32" else 2
        x, y = [], []
        for m in (m for m in measurements if m["dtype"] == dtype):
            _, n, h, i, layers, heads, kv_heads, _, dropout = m["shape"]
            off, on = m["checkpointing_off"]["phase_peaks"], m["checkpointing_on"]["phase_peaks"]
            per_layer = (off["loss backward"] - on["loss backward"]) / layers / c / n + h  # elements per token
            kv = kv_heads * (h // heads)
            x.append([v / per_layer for v in (h, i, kv, h * (dropout > 0))])
            y.append(1.0)
        if x:
            coefficients = np.linalg.lstsq(np.array(x, float), np.array(y), rcond=None)[0]
            fitted[dtype] = dict(zip(("hidden", "intermediate", "kv", "dropout_hidden"),
                                     (max(0.0, round(float(v), 2)) for v in coefficients), strict=True))
    return fitted


def describe_shape(m: dict) -> str:
    family, n, h, i, layers, heads, kv, vocab, dropout = m["shape"]
    parts = [f"{m['dtype']:8s} {family:5s} tokens {n:5d} hidden {h:4d} inter {i:5d} layers {layers} "
             f"heads {heads:2d}/{kv:<2d} vocab {vocab:5d} dropout {dropout:.2f}"]
    for checkpointing in (False, True):
        measured = m["checkpointing_on" if checkpointing else "checkpointing_off"]["peak_bytes"]
        plan = planned_tensors(m, checkpointing).allocated
        parts.append(f"ckpt {'on ' if checkpointing else 'off'}: measured {measured / MIB:7.1f} MiB planner "
                     f"{plan / MIB:7.1f} MiB {plan / measured - 1:+6.1%}")
    return " | ".join(parts)


def tensors_main(args) -> int:
    import torch

    from qlora_kit.console import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    source = json.loads(Path(args.source).read_text(encoding="utf-8")) if args.source else {}
    measurements = source.get("points", [])
    if not args.source:
        for shape in QUICK if args.quick else SHAPES:
            for dtype in ("float32", "bfloat16"):
                measurements.append(measure_shape(shape, dtype))
                print(describe_shape(measurements[-1]), flush=True)
    else:
        for m in measurements:
            print(describe_shape(m))
    errors = {ck: [planned_tensors(m, ck).allocated / m["checkpointing_on" if ck else "checkpointing_off"]
                   ["peak_bytes"] - 1 for m in measurements] for ck in (False, True)}
    for checkpointing, group in errors.items():
        print(f"checkpointing {'on' if checkpointing else 'off'}: planner {min(group):+.1%} to {max(group):+.1%} "
              f"against the peak of live tensors over {len(group)} points")
    if args.out:
        write_json(args.out, {"tool": "tools/calibrate_cpu_plan.py tensors",
                              "command": "python tools/calibrate_cpu_plan.py " + " ".join(sys.argv[1:]),
                              "versions": versions(), "host": host(), "points": measurements,
                              "planner_errors": {("on" if k else "off"): [round(e, 4) for e in v]
                                                 for k, v in errors.items()}})
    if args.fit:
        print(json.dumps(fit_saved(measurements), indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- baseline

BASELINE_CODE = """
import json, psutil
import torch, transformers, trl, peft, bitsandbytes, datasets, accelerate
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
print(json.dumps({"rss_bytes": psutil.Process().memory_info().rss}))
"""


def measure_baseline(samples: int = 3) -> dict:
    """RSS of fresh interpreters that imported what a training run imports, nothing loaded yet."""
    values = []
    for _ in range(samples):
        out = subprocess.run([sys.executable, "-c", BASELINE_CODE], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
        values.append(json.loads(out.splitlines()[-1])["rss_bytes"])
    return {"rss_gib": [round(v / GIB, 3) for v in values], "median_gib": round(statistics.median(values) / GIB, 3)}


# -------------------------------------------------------------------------------------------------------- runs

def run_cases() -> list[dict]:
    """The runs a user of the CPU path makes: the demo as shipped, and recipes/smol_medical.toml shortened."""
    from qlora_kit.model.smollm2 import find

    cases = [{"name": "demo", "recipe": "recipes/demo.toml", "overrides": []}]
    gguf = find()
    if gguf and FIXTURE_ROWS.is_file():
        # Shortened: 6 of the 60 steps, and replies cut at 128 new tokens (the 768 of the recipe take ~15 minutes).
        smol = ["train.max_steps=6", f"data.source={FIXTURE_ROWS}", "samples.max_new_tokens=128"]
        cases += [{"name": "smol_medical, 6 steps", "recipe": "recipes/smol_medical.toml", "overrides": smol},
                  {"name": "smol_medical, 6 steps, max_length 512, 8 eval rows", "recipe": "recipes/smol_medical.toml",
                   "overrides": [*smol, "data.max_length=512", "data.eval_rows=8", "samples.count=2"]}]
    return cases


def planned_run(case: dict):
    """The CPU plan the run prints before loading its model: the same recipe, rows and examples."""
    import io

    from rich.console import Console

    from qlora_kit.data.examples import build_examples
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.plan.cpu import make_cpu_plan
    from qlora_kit.plan.estimate import read_architecture
    from qlora_kit.recipe.loading import load_recipe

    recipe = load_recipe(REPO / case["recipe"], case["overrides"])
    prepare_gguf_base(recipe.model, weights=True)
    examples = build_examples(recipe, load_tokenizer(recipe.model), Console(file=io.StringIO()))
    arch = read_architecture(recipe.model)
    return arch, make_cpu_plan(arch, recipe, [len(e.input_ids) for e in examples.train],
                               [len(e.input_ids) for e in examples.eval])


def run_case(case: dict, out_dir: Path) -> dict:
    """One `python -m qlora_kit.run` in its own process, with the plan made just before (rates measured then)."""
    arch, plan = planned_run(case)
    load_before = os.getloadavg()[0]
    command = [sys.executable, "-m", "qlora_kit.run", case["recipe"], *case["overrides"], f"output.dir={out_dir}",
               "--overwrite", "--restart"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS, which Popen.wait would discard
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode:
        raise SystemExit(f"{case['name']} failed:\n{log[-4000:]}")
    from qlora_kit.plan.cpu import measure_rates

    rates_after = measure_rates(arch.hidden, arch.intermediate)  # the load changes: both ends are recorded
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"case": case["name"], "command": " ".join(["python -m qlora_kit.run", case["recipe"], *case["overrides"]]),
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "rates_after": rates_after.as_dict(), "wall_s": round(wall, 1), "summary": summary,
            "plan": plan.as_dict(), "step_times_s": step_times(metrics), "eval_s": eval_seconds(metrics),
            "samples_s": samples_seconds(out_dir), "sample_tokens": sample_tokens(out_dir),
            "max_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3), "log_tail": log[-2500:]}


def eval_seconds(metrics: list[dict]) -> float:
    """Seconds of every pass over the held-out rows: the 16-bit base's, the NF4 base's, the periodic and final ones
    (summary.json's eval_time_s counts only those after the first step)."""
    return round(sum(r.get("eval_runtime", 0.0) + r.get("base_16bit_eval_runtime", 0.0) for r in metrics), 1)


def sample_tokens(out_dir: Path) -> int | None:
    """New tokens of every end-of-run reply, from samples.md's "reply of N tokens"."""
    import re

    path = out_dir / "samples.md"
    if not path.is_file():
        return None
    return sum(int(n) for n in re.findall(r"reply of (\d+) tokens", path.read_text(encoding="utf-8")))


def step_times(metrics: list[dict]) -> list[float]:
    """time_s between consecutive logged training steps (the periodic evaluations taken out)."""
    rows = [r for r in metrics if "loss" in r and "time_s" in r]
    return [round(b["time_s"] - a["time_s"], 2) for a, b in zip(rows, rows[1:], strict=False)]


def samples_seconds(out_dir: Path) -> float | None:
    """From loss_curve.png (written as training ends) to samples.md (after the end-of-run replies)."""
    curve, samples = out_dir / "loss_curve.png", out_dir / "samples.md"
    if not (curve.is_file() and samples.is_file()):
        return None
    return round(samples.stat().st_mtime - curve.stat().st_mtime, 1)


def runs_main(args) -> int:
    source = json.loads(Path(args.source).read_text(encoding="utf-8")) if args.source else {}
    trials = source.get("trials", [])
    if not args.source:
        baseline = measure_baseline()
        print(f"baseline RSS: {baseline}", flush=True)
        source = {"tool": "tools/calibrate_cpu_plan.py runs",
                  "command": "python tools/calibrate_cpu_plan.py " + " ".join(sys.argv[1:]),
                  "versions": versions(), "host": host(), "baseline": baseline, "trials": trials}
        for round_number in range(args.rounds):
            for case in run_cases():
                with tempfile.TemporaryDirectory(prefix="qlora_kit-cpu-plan-run-") as folder:
                    trial = {"round": round_number, **run_case(case, Path(folder) / "run")}
                trials.append(trial)
                print(json.dumps({k: v for k, v in trial.items() if k != "log_tail"}), flush=True)
                if args.out:  # after every run: an hour of measurements survives a failure in the next one
                    write_json(args.out, source)
    for trial in trials:
        print(describe_run(trial))
    if args.out:
        write_json(args.out, source)
    if args.fit:
        print(json.dumps({"speed": fit_speed(trials), "ram": fit_ram(trials, source.get("baseline"))}, indent=1))
    return 0


def fit_ram(trials: list[dict], baseline: dict | None) -> dict:
    """qlora_kit.plan.cpu's allocator shares from the runs' peak RSS: RSS - libraries - rows - the live tensors at
    the peak = share x every layer's activations + share x the base in float32 (x 2 when the 16-bit base was
    evaluated first), least squares of the relative error over the runs whose tensors are more than the rounding."""
    import numpy as np

    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.plan.cpu import ACTIVATIONS_OFF, ACTIVATIONS_ON, model_parameters
    from qlora_kit.plan.estimate import read_architecture
    from qlora_kit.recipe.loading import load_recipe

    rows, points = [], []
    for trial in trials:
        plan = trial["plan"]
        case = next(c for c in run_cases() if c["name"] == trial["case"])
        recipe = load_recipe(REPO / case["recipe"], case["overrides"])
        prepare_gguf_base(recipe.model, weights=False)
        float32_model = 4 * model_parameters(read_architecture(recipe.model)) / GIB
        sixteen_bit = any(name.startswith("16-bit base") for name in plan["moments_gib"])
        activations = plan["terms_gib"].get(ACTIVATIONS_OFF, 0) + plan["terms_gib"].get(ACTIVATIONS_ON, 0)
        libraries = baseline["median_gib"] if baseline else plan["terms_gib"]["Python + torch + training libraries "
                                                                              "(measured)"]
        excess = (trial["max_rss_gib"] - libraries - plan["terms_gib"]["rows read and tokenized"]
                  - plan["tensors_gib"])
        points.append({"case": trial["case"], "round": trial["round"], "excess_gib": round(excess, 3),
                       "activations_gib": activations, "float32_model_gib": round(float32_model, 3),
                       "planned_peak_gib": plan["peak_gib"], "measured_peak_gib": trial["max_rss_gib"]})
        if activations > 0.05:
            rows.append(([activations, float32_model * (2 if sixteen_bit else 1)], excess))
    shares = np.linalg.lstsq(np.array([[c / y for c in x] for x, y in rows]), np.ones(len(rows)), rcond=None)[0] \
        if rows else (None, None)
    return {"activations_share": round(float(shares[0]), 3) if rows else None,
            "weights_share": round(float(shares[1]), 3) if rows else None, "points": points}


def nonnegative_fit(rows: list[tuple[list[float], float]]) -> tuple[list[float], list[float]]:
    """Least squares of the relative error (a short run weighs as much as a long one), every coefficient >= 0: a
    negative one is noise around zero, dropped and the rest refitted. Returns (coefficients, measured / fitted)."""
    import numpy as np

    active = list(range(len(rows[0][0])))
    while True:
        x = np.array([[columns[k] / y for k in active] for columns, y in rows], float)
        solution = np.linalg.lstsq(x, np.ones(len(rows)), rcond=None)[0]
        if (solution >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(solution)))
    coefficients = [0.0] * len(rows[0][0])
    for k, value in zip(active, solution, strict=True):
        coefficients[k] = max(float(value), 0.0)
    return coefficients, [y / float(np.dot(columns, coefficients)) for columns, y in rows]


def fit_speed(trials: list[dict]) -> dict:
    """qlora_kit.plan.cpu_time.SPEED from measured runs, each at the mean of the rates measured before and after it.

    In matmul work (seconds x the measured rate, so that a busier CPU scales everything alike): training = tokens x
    FLOPs per token / efficiency + micro-batches x (layers + 1) x overhead; evaluation = FLOPs / efficiency + rows
    evaluated x (layers + 1) x overhead; samples = new tokens x (bytes per token / memory rate, in seconds, taken
    out first) + new tokens x (layers + 1) x overhead. Start-up: the wall time left over, the mean. `spread`: the
    largest factor between measured and fitted seconds."""
    import statistics as stats

    def rate(trial, key):
        return (trial["plan"]["time"]["rates"][key] + trial["rates_after"][key]) / 2 * 1e9

    train, evals, samples, startup = [], [], [], []
    for trial in trials:
        s, t = trial["summary"], trial["plan"]["time"]
        flops, passes = rate(trial, "matmul_gflops"), t["layers"] + 1
        seconds = s["wall_time_s"] - s["eval_time_s"]
        tokens = s["tokens_per_s"] * seconds
        train.append(([tokens * t["train_flops_per_token"], t["micro_batches"] * passes * 1e9], seconds * flops))
        if t["eval_flops"]:
            evals.append(([t["eval_flops"], t["evaluations"] * t["eval_rows"] * passes * 1e9], trial["eval_s"] * flops))
        if trial.get("sample_tokens"):
            reading = trial["sample_tokens"] * t["bytes_per_new_token"] / rate(trial, "memory_gbs")
            samples.append(([trial["sample_tokens"] * passes * 1e9], max(trial["samples_s"] - reading, 0.01) * flops))
        startup.append(trial["wall_s"] - seconds - trial["eval_s"] - (trial["samples_s"] or 0))
    (inverse_train, train_layer), train_ratios = nonnegative_fit(train)
    (inverse_eval, eval_layer), eval_ratios = nonnegative_fit(evals)
    (generate_layer,), sample_ratios = nonnegative_fit(samples)
    ratios = train_ratios + eval_ratios + sample_ratios
    return {"train_efficiency": round(1 / inverse_train, 3) if inverse_train else None,
            "train_layer_overhead_gflop": round(train_layer, 4), "eval_efficiency":
            round(1 / inverse_eval, 3) if inverse_eval else None, "eval_layer_overhead_gflop": round(eval_layer, 4),
            "generate_layer_overhead_gflop": round(generate_layer, 4), "startup_s": round(stats.mean(startup), 1),
            "spread": round(max(max(r, 1 / r) for r in ratios), 2),
            "measured_over_fitted": {"train": [round(r, 2) for r in train_ratios],
                                     "eval": [round(r, 2) for r in eval_ratios],
                                     "samples": [round(r, 2) for r in sample_ratios],
                                     "startup_s": [round(v, 1) for v in startup]}}


def describe_run(trial: dict) -> str:
    s, plan = trial["summary"], trial["plan"] or {}
    line = (f"{trial['case']} (round {trial['round']}, load {trial['load_average_before']:.1f}): "
            f"peak RSS {trial['max_rss_gib']} GiB (summary {s.get('peak_ram_gib')}), {s['tokens_per_s']} tok/s, "
            f"train {s['wall_time_s'] - s['eval_time_s']:.0f} s, eval {trial['eval_s']:.0f} s, "
            f"samples {trial['samples_s']} s, wall {trial['wall_s']:.0f} s")
    if plan:
        line += (f" | plan: peak {plan['peak_gib']:.2f} GiB, {plan['time']['train_tokens_per_s']:.0f} tok/s, "
                 f"train {plan['time']['train_s']:.0f} s, eval {plan['time']['eval_s']:.0f} s, "
                 f"samples ≤ {plan['time']['samples_s']:.0f} s")
    return line


# ------------------------------------------------------------------------------------------------------ shared


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets")}


def host() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "shared": "yes: other engineers' jobs ran"}


def write_json(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"written: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("what", choices=("tensors", "baseline", "runs"))
    parser.add_argument("--quick", action="store_true", help="tensors: one shape")
    parser.add_argument("--rounds", type=int, default=1, help="runs: every case this many times, interleaved")
    parser.add_argument("--from", dest="source", help="read these measurements instead of measuring")
    parser.add_argument("--out", help="write the measurements to this JSON")
    parser.add_argument("--fit", action="store_true", help="print the constants the measurements imply")
    args = parser.parse_args(argv)
    if args.what == "baseline":
        print(json.dumps(measure_baseline()))
        return 0
    return tensors_main(args) if args.what == "tensors" else runs_main(args)


if __name__ == "__main__":
    sys.exit(main())
