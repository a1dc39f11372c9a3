"""Where CPU time goes, and what qlora_kit's CPU settings change, on the real SmolLM2-135M-Instruct:

    python tools/bench_cpu_speed.py [--steps 4] [--eval-rows 4] [--new-tokens 32] [--rounds 2] [--out FILE.json]

Each variant runs in its own process (OpenMP reads its settings once, when torch loads it), the variants
interleaved over `--rounds` rounds so that a change in the machine's load hits them alike. Each process builds
qlora_kit's own training setup for the SmolLM2 GGUF base (NF4, LoRA r 16 on all linear layers, TRL) on real
medical-o1 rows where the fixtures are present (else the demo rows), batch 1, and measures

    train      tokens/s over `--steps` optimizer steps after one warm-up step
    eval       rows/s of qlora_kit.train.eval_loss over `--eval-rows` held-out rows, and of transformers' evaluation
               loop (what TRL ran before it) over the same rows
    generate   greedy new tokens/s, with and without qlora_kit.chat.cpu_inference's dequantized weights

Variants: `spin` (OMP_WAIT_POLICY=ACTIVE: threads spin between parallel regions, what an unset policy does for
a while after each region), `passive` (qlora_kit's default since it sets OMP_WAIT_POLICY=PASSIVE), each with
gradient checkpointing on and off. The machine's load average is recorded beside every measurement: on a CPU
shared with other programs the spinning threads are what costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURE_ROWS = REPO.parent / "shared" / "fixtures" / "medical_o1_en.jsonl"
VARIANTS = {"spin, checkpointing on": ("ACTIVE", True), "passive, checkpointing on": ("PASSIVE", True),
            "spin, checkpointing off": ("ACTIVE", False), "passive, checkpointing off": ("PASSIVE", False)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval-rows", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu-speed-smollm2.json")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="keep N busy processes running during every trial: a CPU shared with other programs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> dict:
    """One variant in this process: train, eval, generate; returns the figures."""
    import io

    import torch
    from rich.console import Console
    from transformers import TrainerCallback

    from qlora_kit.chat.cpu_inference import dequantized_weights
    from qlora_kit.chat.generate import GenerationSettings, generate_ids, prompt_format
    from qlora_kit.console import quiet_libraries
    from qlora_kit.data.encode import to_dataset
    from qlora_kit.data.examples import build_examples
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.loading import add_lora, choose_precision, load_model, load_tokenizer
    from qlora_kit.model.smollm2 import find
    from qlora_kit.recipe.loading import recipe_from_dict
    from qlora_kit.train.eval_loss import evaluate_losses
    from qlora_kit.train.fit import build_trainer

    quiet_libraries()
    _, checkpointing = VARIANTS[args.worker]
    rows = FIXTURE_ROWS if FIXTURE_ROWS.is_file() else REPO / "qlora_kit" / "demo" / "data.jsonl"
    gguf = find()
    recipe = recipe_from_dict({
        "model": {"name": str(gguf.parent), "gguf_file": str(gguf)},
        "data": {"source": str(rows), "max_length": args.max_length, "eval_rows": args.eval_rows},
        "train": {"max_steps": args.steps + 1, "batch_size": 1, "grad_accum": 1, "save_steps": 0,
                  "gradient_checkpointing": checkpointing, "learning_rate": 1e-4, "warmup": 0},
        "samples": {"count": 1}})
    prepare_gguf_base(recipe.model, weights=True)
    tokenizer = load_tokenizer(recipe.model)
    examples = build_examples(recipe, tokenizer, Console(file=io.StringIO()))
    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.monotonic())

    clock = StepClock()
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(examples.train), None, precision,
                            Path(os.environ["BENCH_TMP"]), [clock])
    trainer.train()
    # The steps after the first (warm-up): TRL's running token count (prompt + completion) between their ends.
    counts = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    tokens, train_s = counts[-1] - counts[0], clock.ends[-1] - clock.ends[0]

    started = time.monotonic()
    loss = evaluate_losses(trainer.model, examples.eval)
    eval_s = time.monotonic() - started
    # Before qlora_kit.train.eval_loss: transformers' evaluation loop over the same rows as TRL runs it (full logits
    # over the whole vocabulary at every position, TRL's entropy and token accuracy on top).
    started = time.monotonic()
    stock = trainer.evaluate(eval_dataset=to_dataset(examples.eval))
    stock_s = time.monotonic() - started

    fmt = prompt_format(tokenizer, recipe.data)
    ids = fmt.prompt_ids(tokenizer, examples.sample_rows[0].question)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, greedy=True)
    generated = {}
    for cached in (False, True):
        started = time.monotonic()
        if cached:
            with dequantized_weights(trainer.model):
                out = generate_ids(trainer.model, tokenizer, ids, settings)
        else:
            out = generate_ids(trainer.model, tokenizer, ids, settings)
        generated[cached] = (len(out), time.monotonic() - started, out)
    assert generated[True][2] == generated[False][2], "dequantized weights changed the greedy tokens"
    return {"train_tokens_per_s": round(tokens / train_s, 1), "train_s_per_step": round(train_s / args.steps, 2),
            "eval_rows_per_s": round(len(examples.eval) / eval_s, 3), "eval_loss": round(loss.loss, 6),
            "eval_rows_per_s_transformers_loop": round(len(examples.eval) / stock_s, 3),
            "eval_loss_transformers_loop": round(stock["eval_loss"], 6),
            "train_loss": next(round(r["train_loss"], 6) for r in trainer.state.log_history if "train_loss" in r),
            "generate_tokens_per_s": round(generated[False][0] / generated[False][1], 2),
            "generate_tokens_per_s_dequantized_once": round(generated[True][0] / generated[True][1], 2),
            "torch_threads": torch.get_num_threads(), "load_average_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    trials = []
    # Busy loops in their own processes: what a browser, a compiler or another job does to a shared CPU.
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.background_load)]
    try:
        run_trials(args, trials)
    finally:
        for process in load:
            process.kill()
    import torch

    report = {"what": "tools/bench_cpu_speed.py: SmolLM2-135M-Instruct (Q4_1 GGUF base, NF4 + LoRA r 16), batch 1",
              "command": "python tools/bench_cpu_speed.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "background_load_processes": args.background_load,
              "rows": "medical-o1 fixtures" if FIXTURE_ROWS.is_file() else "demo rows",
              "torch": torch.__version__, "trials": trials}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0


def run_trials(args, trials: list) -> None:
    import tempfile

    for round_number in range(args.rounds):
        for name, (policy, _) in VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "OMP_WAIT_POLICY": policy, "BENCH_TMP": tmp, "PYTHONPATH": str(REPO)}
                load = os.getloadavg()[0]
                command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--eval-rows",
                           str(args.eval_rows), "--new-tokens", str(args.new_tokens), "--max-length",
                           str(args.max_length)]
                result = subprocess.run(command, env=env, capture_output=True, text=True)
            line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
            trial = {"variant": name, "round": round_number, "load_average_before": load, **json.loads(line[7:])}
            trials.append(trial)
            print(json.dumps(trial), flush=True)


if __name__ == "__main__":
    sys.exit(main())
