"""Check (and re-fit) the VRAM planner's activation terms against tensor-level measurements of real training steps.

    python tools/calibrate_plan.py                       # the whole grid, ~10 min on 2 CPU cores; table + worst error
    python tools/calibrate_plan.py --quick               # 5 shapes, ~40 s
    python tools/calibrate_plan.py --out bench/results/cpu-calibration.json
    python tools/calibrate_plan.py --from bench/results/cpu-calibration.json --fit   # re-derive the coefficients
    python tools/calibrate_plan.py --from F.json --complete --out F.json            # measure only what F lacks

Why on a CPU: the planner's activation terms (qlora_kit.plan.PROFILES) describe which tensors PyTorch keeps alive
during a QLoRA step: checkpointed layer inputs, the recomputed layer and its gradients, bitsandbytes' dequantized
weight, TRL's chunked loss tiles. Those are the same tensors on a CPU, and qlora_kit.plan.tensor_peak counts them op by
op, so each term can be measured without a GPU. A point is one real qlora_kit training run (tools/bench.py's
trial: random weights, real NF4, real LoRA r 32 on all linear layers, two TRL steps at batch 1), on a shape
that keeps the architecture family and the layer dimensions but shrinks the depth and, mostly, the vocabulary.
`bfloat16` points run under bf16 autocast with float32 adapters, as qlora_kit does on a GPU; `float32` points
are qlora_kit on a CPU; `tiled` points turn on memory.tiled_mlp.

What a CPU cannot show: the CUDA context, the caching allocator's slack, and TRL's Triton loss kernel (on a GPU
it folds each logits tile in place; on a CPU torch ops make ~7 float32 copies, which the planner adds for CPU
only). Those wait for tools/bench.py on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

import bench  # noqa: E402  (tools/bench.py: model building and the trial's trainer)

MIB = 1024**2
# family, tokens, hidden, intermediate, layers, heads, kv heads, vocab: varied one at a time around a small core,
# then the three targets' real layer dimensions (R1-Distill-Qwen-1.5B / -7B, -Llama-8B), then the full vocabulary.
SHAPES = [
    ("qwen2", 512, 1024, 4096, 2, 8, 2, 1024), ("qwen2", 512, 1024, 4096, 2, 16, 4, 1024),
    ("qwen2", 512, 1024, 4096, 2, 8, 8, 1024), ("qwen2", 512, 1024, 2048, 2, 8, 2, 1024),
    ("qwen2", 512, 512, 4096, 2, 8, 2, 1024), ("qwen2", 256, 1024, 4096, 2, 8, 2, 1024),
    ("qwen2", 1024, 512, 1536, 3, 4, 1, 1024), ("qwen2", 768, 768, 3072, 2, 12, 4, 1024),
    ("qwen2", 512, 2048, 5632, 1, 16, 2, 1024), ("qwen2", 2048, 512, 2048, 2, 8, 2, 1024),
    ("llama", 512, 1024, 4096, 2, 8, 2, 1024), ("llama", 1024, 1024, 3584, 2, 8, 8, 1024),
    ("llama", 512, 2048, 7168, 1, 16, 4, 1024), ("llama", 1536, 512, 2048, 3, 8, 2, 1024),
    *[("qwen2", 1024, 1024, 4096, layers, 8, 2, 1024) for layers in (1, 2, 4, 8, 12)],  # the depth sweep
    *[("qwen2", n, 256, 1024, 1, 4, 2, 1024) for n in (1024, 2048, 4096, 8192)],  # the length sweep
    *[("qwen2", n, 256, 768, 2, 4, 2, 40000) for n in (256, 512, 1024, 2048)],  # loss-dominated
    ("qwen2", 256, 1536, 8960, 2, 12, 2, 1024), ("qwen2", 1024, 1536, 8960, 2, 12, 2, 1024),
    ("qwen2", 2048, 1536, 8960, 2, 12, 2, 1024), ("qwen2", 256, 3584, 18944, 1, 28, 4, 1024),
    ("qwen2", 1024, 3584, 18944, 1, 28, 4, 1024), ("llama", 256, 4096, 14336, 1, 32, 8, 1024),
    ("llama", 1024, 4096, 14336, 1, 32, 8, 1024), ("llama", 2048, 4096, 14336, 1, 32, 8, 1024),
    ("qwen2", 512, 1536, 8960, 2, 12, 2, 151936), ("qwen2", 2048, 1536, 8960, 2, 12, 2, 151936),
]
# Held out of the fit: longer, deeper, the targets' dimensions; they check that the fit extrapolates.
VALIDATION = [("qwen2", 4096, 1536, 8960, 6, 12, 2, 1024, "bfloat16", 0.0, False),
              ("qwen2", 8192, 1536, 8960, 4, 12, 2, 1024, "bfloat16", 0.0, False),
              ("qwen2", 4096, 1536, 8960, 12, 12, 2, 1024, "bfloat16", 0.0, False),
              ("qwen2", 2048, 3584, 18944, 2, 28, 4, 1024, "bfloat16", 0.0, False),
              ("llama", 4096, 4096, 14336, 2, 32, 8, 1024, "bfloat16", 0.0, False),
              ("qwen2", 4096, 1536, 8960, 3, 12, 2, 151936, "bfloat16", 0.0, False),
              ("llama", 2048, 4096, 14336, 2, 32, 8, 1024, "float32", 0.0, False)]
# memory.tiled_mlp: the MLP's intermediates are bounded by the slice (qlora_kit.model.tiled_mlp); lengths past the
# slice.
TILED_SHAPES = [("qwen2", 2048, 1024, 4096, 2, 8, 2, 1024), ("qwen2", 4096, 1024, 4096, 2, 8, 2, 1024),
                ("qwen2", 8192, 1536, 8960, 2, 12, 2, 1024), ("qwen2", 4096, 512, 2048, 2, 8, 2, 1024),
                ("qwen2", 4096, 3584, 18944, 1, 28, 4, 1024), ("llama", 8192, 4096, 14336, 1, 32, 8, 1024)]
DROPOUT_SHAPES = [("qwen2", 512, 1024, 4096, 2, 8, 2, 1024), ("qwen2", 512, 1024, 2048, 2, 8, 2, 1024),
                  ("qwen2", 1024, 1536, 8960, 2, 12, 2, 1024), ("qwen2", 1024, 3584, 18944, 1, 28, 4, 1024)]
# Small on purpose: a CPU without native bfloat16 (AVX2 only, no AVX-512 BF16 / AMX) multiplies bfloat16 matrices in
# a scalar fallback, 6x (F.linear) to 200x (a non-transposed matmul, as in every backward) slower than float32; the
# shapes of an earlier QUICK took 2.8 s on a bf16-capable host and 470 s on an AVX2 one. These keep the phase each
# test names (the layer's backward for 1 and 2, the loss tiles for 3) at a fraction of the arithmetic.
QUICK = [("qwen2", 512, 1024, 4096, 2, 8, 2, 1024, "bfloat16", 0.0, False),
         ("qwen2", 256, 768, 4096, 1, 8, 2, 512, "bfloat16", 0.0, False),
         ("qwen2", 256, 1024, 4096, 1, 8, 2, 512, "bfloat16", 0.05, False),
         ("qwen2", 512, 256, 768, 2, 4, 2, 40000, "float32", 0.0, False),
         ("qwen2", 4096, 512, 2048, 1, 8, 2, 1024, "float32", 0.0, True)]
FAMILY = {"qwen2": "r1-distill-qwen-1.5b", "llama": "r1-distill-llama-8b"}  # config templates (RoPE, bias, ...)


def grid() -> list[tuple]:
    points = []
    for dtype in ("bfloat16", "float32"):
        points += [(*shape, dtype, 0.0, False) for shape in SHAPES]
        points += [(*shape, dtype, 0.05, False) for shape in DROPOUT_SHAPES]
        points += [(*shape, dtype, 0.0, True) for shape in TILED_SHAPES]
    return points + VALIDATION


def as_point(values) -> tuple:
    """A point from JSON (older files lack the trailing `tiled` field)."""
    values = list(values)
    return tuple(values + [False] * (11 - len(values)))


def point_config(family: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """config.json essentials of a point: the family's template, the bench tokenizer's bos/eos ids, these sizes."""
    config = dict(_family_template(family))
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  vocab_size=vocab, max_position_embeddings=65536)
    return config


@functools.cache
def _family_template(family: str) -> dict:
    return bench.model_config(FAMILY[family], smoke=True)  # reads the tokenizer's ids from disk: once


def setup_of(tiled: bool):
    return bench.parse_setup("qlora_kit+tiled_mlp" if tiled else "qlora_kit")


def settings(dtype: str, dropout: float) -> dict:
    return {"smoke": False, "budget_gib": 0, "warmup": 0, "steps": 2, "search_steps": 2, "max_len": 65536,
            "resolution": 256, "lora": {"r": 32, "alpha": 64, "dropout": dropout}, "prompt_tokens": 32, "seed": 0,
            "batch_size": 1, "cpu_dtype": dtype}


def measure(point: tuple) -> dict:
    """Two qlora_kit training steps at this point, counted by qlora_kit.tensor_peak."""
    family, tokens, hidden, intermediate, layers, heads, kv_heads, vocab, dtype, dropout, tiled = point
    config = point_config(family, hidden, intermediate, layers, heads, kv_heads, vocab)
    spec = {"model": FAMILY[family], "setup": setup_of(tiled).name, "config": config,
            "settings": settings(dtype, dropout),
            "length": tokens, "warmup": 0, "steps": 2, "capped": False}
    started = time.monotonic()
    model = bench.build_model(spec)
    bench._STATE_CACHE.clear()  # the random source tensors are not part of training
    with tempfile.TemporaryDirectory(prefix="qlora_kit-calibrate-") as folder:
        trainer = bench.build_bench_trainer(spec, model, bench.bench_tokenizer(), Path(folder),
                                            bench.make_step_timer(False))
        gc.collect()
        with bench.tensor_peak(False, trainer.model) as counter:  # the same counting as a bench CPU trial
            trainer.train()
        _, allocated, paged = bench.optimizer_state_bytes(trainer)
        optimizer_bytes = allocated + paged
        lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer, model
    gc.collect()
    return {"point": list(point), "start_bytes": counter.start_bytes, "peak_bytes": counter.peak_bytes,
            "phase_peaks": counter.phase_peaks, "optimizer_bytes": optimizer_bytes, "lora_params": lora,
            "seconds": round(time.monotonic() - started, 1)}


def planned(point: tuple):
    """The planner's CPU estimate for the point, exactly as a bench trial records it."""
    family, tokens, hidden, intermediate, layers, heads, kv_heads, vocab, dtype, dropout, tiled = point
    config = point_config(family, hidden, intermediate, layers, heads, kv_heads, vocab)
    return bench.planner_estimate(config, setup_of(tiled), tokens, settings(dtype, dropout), "cpu")


def error_of(measurement: dict, plan=None) -> float:
    """+: the planner says more than was measured."""
    plan = plan or planned(as_point(measurement["point"]))
    return plan.allocated / measurement["peak_bytes"] - 1


def describe(measurement: dict) -> str:
    point = as_point(measurement["point"])
    family, tokens, hidden, intermediate, layers, heads, kv, vocab, dtype, dropout, tiled = point
    peaks = measurement["phase_peaks"]
    where = max(peaks, key=peaks.get)
    plan = planned(point)
    planned_where = max(plan.phases, key=plan.phases.get)
    return (f"{dtype:8s} {family:5s} tokens {tokens:5d} hidden {hidden:4d} inter {intermediate:5d} layers {layers:2d} "
            f"heads {heads:2d}/{kv:<2d} vocab {vocab:6d} dropout {dropout:.2f}{' tiled' if tiled else ''} | measured "
            f"{measurement['peak_bytes'] / MIB:7.1f} MiB ({where}) planner {plan.allocated / MIB:7.1f} MiB "
            f"({planned_where}) {error_of(measurement, plan):+6.1%}"
            + ("  [held out of the fit]" if point in set(VALIDATION) else ""))


# ----------------------------------------------------------------------------------------------------------------
# Re-deriving the coefficients of qlora_kit.plan.PROFILES from measurements


def fit(measurements: list[dict]) -> dict[str, dict[str, float]]:
    """Least squares of the relative error per dtype, phase by phase, over the points not held out (VALIDATION).

    Layer phase (the backward of a recomputed layer): measured peak - start - optimizer state - one layer's LoRA
    gradients = kept x layers x tokens x hidden + tokens x (a x hidden + b x intermediate + c x kv width) +
    d x largest weight (+ dropout terms), all in compute-dtype elements. `kept` is the slope of the depth sweep
    (one shape, 1-12 layers); the rest are fitted with it fixed, since depth and width are confounded otherwise.
    Loss phase: peak - start - optimizer state = layers x tokens x hidden (the layer inputs) + e x tokens x hidden
    + one [rows, 32768] tile + f x float32 copies of the tile (a CPU has no Triton)."""
    import numpy as np

    from qlora_kit.recipe.schema import TILED_MLP_SLICE_TOKENS as SLICE_TOKENS

    profiles = {}
    held_out = {tuple(v) for v in VALIDATION}
    points = [(as_point(m["point"]), m) for m in measurements]
    for dtype in ("bfloat16", "float32"):
        rows = [(point, m) for point, m in points if point[8] == dtype and point not in held_out]
        c = 2 if dtype == "bfloat16" else 4

        def dims(point):
            family, n, h, i, layers, heads, kv_heads, vocab, _, dropout, tiled = point
            mlp_tokens = SLICE_TOKENS if tiled and n > SLICE_TOKENS else n  # as plan.estimate
            return n, h, i, layers, kv_heads * (h // heads), vocab, dropout > 0, mlp_tokens

        def layer_excess(point, m):
            return (m["phase_peaks"]["backward"] - m["start_bytes"] - m["optimizer_bytes"]
                    - m["lora_params"] * 4 / point[4])

        sweep = sorted(((point, m) for point, m in rows if point[1:4] == (1024, 1024, 4096)
                        and point[5:8] == (8, 2, 1024) and not point[9] and not point[10]), key=lambda pm: pm[0][4])
        depth = np.array([point[4] for point, _ in sweep], float)
        slope = np.polyfit(depth, [layer_excess(point, m) for point, m in sweep], 1)[0]
        kept = slope / (1024 * 1024 * c)

        x, y = [], []
        for point, m in rows:
            if point[7] > 1024 or point[10]:
                continue  # a big vocabulary puts the peak in the loss; tiled points are fitted below
            n, h, i, layers, kv, vocab, drop, _ = dims(point)
            scale = c / m["phase_peaks"]["backward"]  # relative error: small shapes count as much as big ones
            x.append([v * scale for v in (n * h, n * i, n * kv, max(h * h, h * i), drop * n * h, drop * n * i)])
            y.append((layer_excess(point, m) / c - kept * layers * n * h) * scale)
        a, b, kv_coef, dequant, drop_h, drop_i = np.linalg.lstsq(np.array(x, float), np.array(y), rcond=None)[0]

        # Tiled MLP: the intermediates shrink to one slice and the peak moves towards the attention's backward,
        # whose mix of hidden- and kv-sized tensors differs: its own two per-token coefficients, the rest fixed.
        x, y = [], []
        for point, m in rows:
            if not point[10]:
                continue
            n, h, i, layers, kv, vocab, drop, mlp_n = dims(point)
            scale = c / m["phase_peaks"]["backward"]
            x.append([n * h * scale, n * kv * scale])
            y.append((layer_excess(point, m) / c - kept * layers * n * h - b * mlp_n * i
                      - dequant * max(h * h, h * i)) * scale)
        tiled_h, tiled_kv = np.linalg.lstsq(np.array(x, float), np.array(y), rcond=None)[0] if x else (a, kv_coef)

        x, y = [], []
        for point, m in rows:
            n, h, i, layers, kv, vocab, drop, _ = dims(point)
            tile_rows, scale = min(n, 4096), 1 / m["phase_peaks"]["loss backward"]
            x.append([n * h * c * scale, tile_rows * min(vocab, 32768) * 4 * scale])
            y.append((m["phase_peaks"]["loss backward"] - m["start_bytes"] - m["optimizer_bytes"]
                      - layers * n * h * c - tile_rows * 32768 * c) * scale)
        loss_hidden, fp32_copies = np.linalg.lstsq(np.array(x, float), np.array(y), rcond=None)[0]
        profiles[dtype] = {"kept_per_layer": kept, "layer_hidden": a, "layer_intermediate": b, "layer_kv": kv_coef,
                           "tiled_hidden": tiled_h, "tiled_kv": tiled_kv,
                           "dequant": dequant, "dropout_hidden": drop_h, "dropout_intermediate": drop_i,
                           "loss_hidden": loss_hidden, "loss_tile_fp32_copies_without_triton": fp32_copies}
    # A negative coefficient is noise around zero (no tensor takes negative memory): clamp it, as plan.py does.
    return {dtype: {k: max(0.0, round(float(v), 2)) for k, v in p.items()} for dtype, p in profiles.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 points instead of the whole grid")
    parser.add_argument("--from", dest="source", help="use the measurements in this JSON instead of measuring")
    parser.add_argument("--complete", action="store_true", help="with --from: also measure the grid's points "
                        "that the file lacks")
    parser.add_argument("--fit", action="store_true", help="print the coefficients the measurements imply")
    parser.add_argument("--out", help="write the measurements (and the planner's errors) to this JSON")
    args = parser.parse_args(argv)

    import torch

    from qlora_kit.console import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the measured tensors do not depend on threads
    source = json.loads(Path(args.source).read_text(encoding="utf-8")) if args.source else {}
    measurements = source.get("points", [])
    for measurement in measurements:
        print(describe(measurement))
    if not args.source or args.complete:
        known = {as_point(m["point"]) for m in measurements}
        for point in QUICK if args.quick else grid():
            if point not in known:
                measurements.append(measure(point))
                print(describe(measurements[-1]), flush=True)
    errors = [error_of(m) for m in measurements]
    held_out = {tuple(v) for v in VALIDATION}
    print()
    for name, chosen in (("fitted", False), ("held-out", True)):
        group = [e for m, e in zip(measurements, errors, strict=True) if (as_point(m["point"]) in held_out) == chosen]
        if group:
            print(f"{len(group)} {name} points: planner error {min(group):+.1%} to {max(group):+.1%} against the "
                  "peak of live tensors on CPU")
    if args.out:
        command = " ".join(["python", "tools/calibrate_plan.py", *(argv or sys.argv[1:])])
        commands = source.get("commands", [source["command"]] if "command" in source else []) + [command]
        doc = {"tool": "tools/calibrate_plan.py", "commands": commands,
               "versions": bench.library_versions(), "host": bench.host_info(), "points": measurements,
               "planner_errors": [round(e, 4) for e in errors]}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"written: {args.out}")
    if args.fit:
        print(json.dumps(fit(measurements), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
