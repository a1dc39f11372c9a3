"""Command line: `python tools/bench.py ...` / `python -m qlora_kit.bench ...`; `main(argv)` for other front ends.

The parent process never imports torch: it plans, searches and records; trials run in a worker process."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from qlora_kit.bench.document import open_document
from qlora_kit.bench.runner import Bench, OutOfTime
from qlora_kit.bench.setups import (
    COUNT_LAYERS,
    COUNT_SETUPS,
    CPU_ONLY_SWITCHES,
    DEFAULT_SETUPS,
    PROTOCOL_MINUTES,
    PROTOCOL_MODELS,
    PROTOCOL_SETUPS,
    PROTOCOL_SPEED_LENGTH,
    REPO,
    SMOKE_MODELS,
    SMOKE_PROTOCOL_MODELS,
    SMOKE_SETUPS,
    SWITCHES,
    Setup,
    _split,
    parse_setup,
)
from qlora_kit.bench.tables import markdown_tables, merge_documents
from qlora_kit.cli import command_name
from qlora_kit.plan.architectures import ARCHITECTURES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_name(None), description=__doc__.split("\n")[0],
                                     epilog="See the module docstring for the "
                                     "GPU protocol.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models through the same code path (CPU or GPU)")
    parser.add_argument("--count", action="store_true",
                        help="CPU: live tensors of a training step at the real layer dimensions and vocabularies, "
                        f"{'/'.join(map(str, COUNT_LAYERS))} layers deep, counted without arithmetic, and the "
                        "full-depth figure (qlora_kit.bench.counts); with --smoke on tiny shapes")
    parser.add_argument("--protocol", action="store_true",
                        help="one GPU command in the order of value, stopping itself by 9 minutes: per model (8B, "
                        "7B, 1.5B) the longest sequence under the cap for qlora_kit with its switches and for the "
                        "baseline, then tokens/s of both at one length; with --smoke its CPU rehearsal")
    parser.add_argument("--count-layers", help=f"depths to count at (default {','.join(map(str, COUNT_LAYERS))})")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full-size models without a GPU anyway (hours, and ~8 GB of RAM per model)")
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(ARCHITECTURES)} (default: all; "
                        f"smoke: {','.join(SMOKE_MODELS)})")
    parser.add_argument("--setups", help=f"comma-separated: baseline, qlora_kit, qlora_kit+SWITCH[+SWITCH] with "
                        f"SWITCH in {', '.join(SWITCHES)} (default: {','.join(DEFAULT_SETUPS)}; smoke: "
                        f"{','.join(SMOKE_SETUPS)})")
    parser.add_argument("--memory", default="", help="memory switches for the plain `qlora_kit` setup, e.g. "
                        "offload_activations,embeddings_on_cpu")
    parser.add_argument("--lengths", help="fixed sequence lengths for peak memory and tokens/s "
                        "(default 1024,2048,4096; smoke 64,128)")
    parser.add_argument("--warmup", type=int, help="untimed steps before the timed ones (default 2; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per fixed length (default 4; smoke 2)")
    parser.add_argument("--search-steps", type=int, default=2, help="steps that must train for a length to fit")
    parser.add_argument("--no-search", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--no-uncapped", action="store_true",
                        help="do not re-run lengths that ran out of memory under the cap without the cap")
    parser.add_argument("--max-len", type=int, help="upper bound of the search (default 32768; smoke 8192)")
    parser.add_argument("--resolution", type=int, default=256, help="search granularity in tokens")
    parser.add_argument("--budget-gib", type=float, default=7.0, help="VRAM cap: an 8 GB card minus context/display")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=64)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="untrained prefix of every sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="CPU only: bfloat16 trains qlora_kit under bf16 autocast, as on a GPU (what "
                        "tools/calibrate_plan.py measures the planner's GPU profile with)")
    parser.add_argument("--max-minutes", type=float, help="start no trial that would end later (default 8.5; "
                        "--count 240)")
    parser.add_argument("--isolate", action="store_true", help="a fresh worker process for every trial")
    parser.add_argument("--out", help="results JSON (default bench/results/<smoke->TIMESTAMP.json)")
    parser.add_argument("--markdown", help="also write the Markdown tables to this file")
    parser.add_argument("--resume", help="results JSON of an earlier run with the same settings: reuse its trials")
    parser.add_argument("--show", nargs="+", metavar="JSON", help="print the tables of result files and exit")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if args.count:
        args.count_layers = sorted({int(n) for n in _split(args.count_layers)} or COUNT_LAYERS)
        args.warmup = 0 if args.warmup is None else args.warmup
        args.steps = args.steps or 2  # the second step runs with the optimizer state allocated
        args.no_search = args.no_uncapped = True
        args.setups = args.setups or ",".join(COUNT_SETUPS)
    if args.protocol and args.count:
        parser.error("--protocol and --count are different modes: one at a time")
    if args.protocol:
        args.models = args.models or ",".join(SMOKE_PROTOCOL_MODELS if smoke else PROTOCOL_MODELS)
        args.setups = args.setups or ",".join(PROTOCOL_SETUPS)
        args.lengths = args.lengths or ("128" if smoke else str(PROTOCOL_SPEED_LENGTH))
    args.max_minutes = args.max_minutes or (240.0 if args.count else PROTOCOL_MINUTES if args.protocol else 8.5)
    args.models = _split(args.models) or (SMOKE_MODELS if smoke else list(ARCHITECTURES))
    args.lengths = sorted({int(n) for n in _split(args.lengths)} or ({64, 128} if smoke else {1024, 2048, 4096}))
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.steps = args.steps if args.steps is not None else (2 if smoke else 4)
    args.max_len = args.max_len or (8192 if smoke else 32768)
    problems = [f"unknown model `{m}`" for m in args.models if m not in ARCHITECTURES]
    try:
        setups = _split(args.setups) or (SMOKE_SETUPS if smoke else DEFAULT_SETUPS)
        args.setups = [parse_setup(s, _split(args.memory)) for s in setups]
    except ValueError as e:
        problems.append(str(e))
    if args.steps < 1 or args.warmup < 0 or args.search_steps < 1:
        problems.append("--steps and --search-steps must be at least 1, --warmup at least 0")
    if any(n <= args.prompt_tokens for n in args.lengths):
        problems.append(f"every length must exceed --prompt-tokens ({args.prompt_tokens})")
    if args.count:
        moved = [s.name for s in getattr(args, "setups", []) if isinstance(s, Setup)
                 and any(w not in CPU_ONLY_SWITCHES for w in s.switches)]
        if moved:
            problems.append(f"--count runs on a CPU, where {', '.join(moved)} change nothing (they move tensors off "
                            "a GPU): use " + ", ".join(COUNT_SETUPS))
        if args.cpu_dtype != "bfloat16":
            problems.append("--count compares under bf16 autocast, as both setups train on a GPU")
    if problems and not args.show:
        parser.error("; ".join(problems))
    return args


def gpu_present() -> bool:
    """Asked in a child process: this parent never imports torch (each trial gets a fresh CUDA context)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() == "True"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        docs = []
        for path in args.show:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            if doc.get("tool") != "tools/bench.py" or "trials" not in doc:
                print(f"bench.py --show: skipping {path}: not a tools/bench.py result (tool: {doc.get('tool')})",
                      file=sys.stderr)
            else:
                docs.append(doc)
        if not docs:
            print("bench.py --show: no tools/bench.py result among the files given", file=sys.stderr)
            return 2
        print(markdown_tables(merge_documents(docs)))
        return 0
    if args.count:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the worker counts on the CPU even where a GPU is
    elif not args.smoke and not args.allow_cpu and not gpu_present():
        print("bench.py: no CUDA GPU here. Full-size models measure VRAM and GPU speed; on a CPU only --smoke "
              "runs (the code path on tiny models). --allow-cpu runs them anyway.", file=sys.stderr)
        return 2
    typed = [Path(sys.executable).name, *sys.argv] if argv is None else [*command_name("bench").split(), *argv]
    command = shlex.join(typed)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    prefix = ("smoke-" if args.smoke else "") + ("count-" if args.count else "")
    out = Path(args.out or REPO / "bench" / "results" / f"{prefix}{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = open_document(args, command)
    bench = Bench(args, doc, out)
    status = 0
    signal.signal(signal.SIGTERM, _interrupt)  # a `timeout` or a killed job still writes its JSON
    try:
        bench.start()
        for model in args.models:
            bench.bench(model)
    except OutOfTime as e:
        doc["runs"][-1]["stopped"] = f"time budget: {e}"
        bench.say(f"stopping: {e}")
    except KeyboardInterrupt:
        doc["runs"][-1]["stopped"] = "interrupted"
        bench.say("interrupted")
        status = 130
    except RuntimeError as e:  # the worker could not even start: its log says why
        doc["runs"][-1]["stopped"] = str(e).splitlines()[0]
        bench.say(str(e))
        status = 1
    finally:
        bench.worker.stop()
        bench.save()
    tables = doc["tables_markdown"]
    print("\n" + tables)
    if args.markdown:
        Path(args.markdown).write_text(tables + "\n", encoding="utf-8")
    print(f"results: {out}")
    return status


def _interrupt(signum, frame):
    raise KeyboardInterrupt
