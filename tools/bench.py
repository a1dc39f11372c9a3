"""VRAM and speed of QLoRA training: qlora_kit against a plain transformers + peft + TRL baseline, in one run.

GPU protocol (../shared/GUIDE.md §4) on one H100, every command under the 10-minute limit:

    python tools/bench.py --smoke --out $OUT/smoke.json                               # ~1 min: CUDA path, tiny models
    python tools/bench.py --smoke --budget-gib 0.05 --out $OUT/smoke-oom.json         # optional: real OOMs, tiny
    python tools/bench.py --models r1-distill-qwen-1.5b --out $OUT/qwen-1.5b.json     # each ~5-8 min, stops by itself
    python tools/bench.py --models r1-distill-qwen-7b --out $OUT/qwen-7b.json
    python tools/bench.py --models r1-distill-llama-8b --out $OUT/llama-8b.json
    python tools/bench.py --show bench/results/qwen-1.5b.json bench/results/qwen-7b.json bench/results/llama-8b.json

The same protocol as one command (about 20 minutes, hence the split above):

    python tools/bench.py --models r1-distill-qwen-1.5b,r1-distill-qwen-7b,r1-distill-llama-8b --budget-gib 7.0 \
        --out $OUT/bench.json

A command stops starting trials when --max-minutes (default 8.5) would be exceeded, and the JSON is rewritten after
every trial, so a stopped or killed command loses nothing finished. To continue one, copy its JSON into bench/results/
on this side and run the same command with `--resume bench/results/qwen-7b.json`: finished trials are reused.
The memory switches are measured as extra setups: the default is the baseline, qlora_kit as shipped, and
`qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp` (every switch on); any combination can be named, e.g.
`--setups baseline,qlora_kit,qlora_kit+tiled_mlp` (or `--memory tiled_mlp` to switch one on for `qlora_kit`).
Three setups take ~1.5x the time of two: if a command stops at --max-minutes, resume it (above).

CPU (no GPU here): `python tools/bench.py --smoke` runs the whole code path on tiny models in well under a minute;
fixed lengths only, no cap (the OOM search is marked skipped), and live tensors counted op by op
(qlora_kit.tensor_peak) stand in for VRAM, next to the planner's CPU estimate. tools/calibrate_plan.py uses the same
trials to check the planner's activation terms on many shapes.

What one trial is
- Model: the architecture of qlora_kit.architectures.ARCHITECTURES with random weights (memory and speed do not
  depend on weight values). Route: `AutoModelForCausalLM.from_pretrained` is swapped, for the trial only, for
  `<ArchClass>.from_pretrained(None, config=..., state_dict=...)` where the state dict holds random bf16 CPU tensors.
  transformers' own loader then quantizes each Linear to NF4 (double quant) on the GPU as it is placed, keeps
  embeddings / lm_head / norms 16-bit, applies the device_map and dispatch hooks, exactly as from files. So the
  qlora_kit setup runs the unmodified `qlora_kit.model.load_model` and the baseline its own `from_pretrained` call;
  no 15 GB checkpoint is written. Layers share their (random) source tensors, so building an 8B model needs ~3 GB
  of host RAM and a few seconds.
- Data: random token ids of one fixed length, batch 1; labels on every token but a short prompt.
- qlora_kit: load_model + add_lora + build_trainer from a recipe (LoRA r 32, alpha 64, all linear layers,
  dropout 0; grad_accum 1), i.e. our SFTConfig, fp32 adapters (keep_adapter_fp32), paged 8-bit AdamW, memory switches.
- baseline: `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute),
  dtype=bfloat16, device_map={"": 0})` and `SFTTrainer(model, peft_config=LoraConfig(same LoRA),
  args=SFTConfig(output_dir, per_device_train_batch_size=1, max_steps, report_to="none", bf16=True))`, TRL 1.16
  defaults otherwise. Deviations, none of which changes memory or speed: max_length = the trial length (the default
  1024 would truncate the sequence), logging_steps=1 (to record the loss), save_strategy="no", disable_tqdm.
- Memory: torch.cuda.set_per_process_memory_fraction(budget / total) emulates an 8 GB laptop GPU; the figure is
  torch.cuda.max_memory_reserved() over load + training, next to the planner's `estimate(...).reserved`.
  bitsandbytes' paged optimizer state lives in CUDA managed memory, outside PyTorch's allocator (so outside both the
  figure and the cap): it is reported separately as paged_optimizer_gib.
- Speed: tokens/s over --steps optimizer steps after --warmup steps, timed with torch.cuda.synchronize().
- A fixed length that runs out of memory under the cap is run again without it (kind "uncapped", marked † in
  the table): what it would need, the planner's error there, and tokens/s for the speed comparison. The planner
  predicts that 7B/8B at LoRA r 32 do not fit 7 GiB even at 1k tokens; without this there would be no numbers.
- Longest sequence: an exponential + binary search in multiples of 256 that starts at the planner's prediction; a
  length "fits" when --search-steps steps (the 2nd step runs with the optimizer state allocated) train without
  torch.OutOfMemoryError.

Process isolation: trials run in a worker process (multiprocessing "spawn": fresh interpreter, fresh CUDA context).
The worker builds a fresh model for every trial and, after each success, frees everything (gc + empty_cache) and
checks that allocated memory is back where it started. After an OOM, any error, or a failed check the worker exits
and the next trial gets a new process: an OOM leaves tensors referenced from the traceback and a fragmented cache,
bitsandbytes never frees its paged (managed) buffers, and TRL patches the model in place. Reusing a healthy worker
saves ~5-10 s of imports per trial, several minutes of the 30-minute GPU budget over a full protocol; `--isolate`
gives every trial its own process instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_kit.architectures import ARCHITECTURES  # noqa: E402  (light: plain dicts)

GIB = 1024**3
SCHEMA = 1
SETUP_BASES = ("baseline", "qlora_kit")
SWITCHES = ("offload_activations", "embeddings_on_cpu", "tiled_mlp")
DEMO_TOKENIZER = REPO / "qlora_kit" / "demo" / "tiny-qwen2"
# Smoke: the same architectures shrunk, so the Qwen2 (qkv bias) and Llama 3.1 (llama3 RoPE) code paths both run.
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 65536}
SMOKE_MODELS = ["r1-distill-qwen-1.5b", "r1-distill-llama-8b"]
# The baseline, qlora_kit as shipped, and qlora_kit with every memory switch (where the longest sequences are).
DEFAULT_SETUPS = ["baseline", "qlora_kit", "qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp"]
SMOKE_SETUPS = ["baseline", "qlora_kit"]
LEAK_TOLERANCE = 256 * 1024**2  # cuBLAS workspaces and the like may stay allocated between trials
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


# ----------------------------------------------------------------------------------------------------------------
# Command line and settings (the parent process never imports torch: it plans, searches and records)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the "
                                     "GPU protocol.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models through the same code path (CPU or GPU)")
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
    parser.add_argument("--cpu-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="CPU only: bfloat16 trains qlora_kit under bf16 autocast, as on a GPU (what "
                        "tools/calibrate_plan.py measures the planner's GPU profile with)")
    parser.add_argument("--max-minutes", type=float, default=8.5, help="start no trial that would end later")
    parser.add_argument("--isolate", action="store_true", help="a fresh worker process for every trial")
    parser.add_argument("--out", help="results JSON (default bench/results/<smoke->TIMESTAMP.json)")
    parser.add_argument("--markdown", help="also write the Markdown tables to this file")
    parser.add_argument("--resume", help="results JSON of an earlier run with the same settings: reuse its trials")
    parser.add_argument("--show", nargs="+", metavar="JSON", help="print the tables of result files and exit")
    args = parser.parse_args(argv)
    smoke = args.smoke
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
    if problems and not args.show:
        parser.error("; ".join(problems))
    return args


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@dataclass(frozen=True)
class Setup:
    name: str
    base: str
    """`baseline` or `qlora_kit`."""
    switches: tuple[str, ...] = ()
    """[memory] switches turned on (qlora_kit only)."""


def parse_setup(text: str, memory: tuple[str, ...] | list[str] = ()) -> Setup:
    base, *switches = text.split("+")
    if base == "qlora_kit" and not switches:
        switches = list(memory)
    if base not in SETUP_BASES:
        raise ValueError(f"unknown setup `{text}`: use {' or '.join(SETUP_BASES)}, optionally qlora_kit+SWITCH")
    bad = [s for s in switches if s not in SWITCHES]
    if bad or (base == "baseline" and switches):
        raise ValueError(f"setup `{text}`: switches are {', '.join(SWITCHES)}, and only for qlora_kit")
    switches = tuple(s for s in SWITCHES if s in switches)  # canonical order: one name per combination
    return Setup("+".join((base, *switches)), base, switches)


def settings_of(args) -> dict:
    """Everything that changes what a trial measures: a resumed file must match it exactly."""
    return {"smoke": args.smoke, "budget_gib": args.budget_gib, "warmup": args.warmup, "steps": args.steps,
            "search_steps": args.search_steps, "max_len": args.max_len, "resolution": args.resolution,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
            "prompt_tokens": args.prompt_tokens, "seed": args.seed, "batch_size": 1, "cpu_dtype": args.cpu_dtype}


def model_config(name: str, smoke: bool) -> dict:
    """config.json essentials; the smoke variant keeps the architecture family but shrinks every dimension."""
    config = dict(ARCHITECTURES[name])
    if smoke:
        tokenizer_ids = json.loads((DEMO_TOKENIZER / "config.json").read_text(encoding="utf-8"))
        config.update(SMOKE_SHAPE, bos_token_id=tokenizer_ids["bos_token_id"],
                      eos_token_id=tokenizer_ids["eos_token_id"])
    return config


# ----------------------------------------------------------------------------------------------------------------
# The planner's view (no torch needed)


def bench_recipe(setup: Setup, length: int, steps: int, settings: dict, model_name: str = "bench/random"):
    """The recipe a qlora_kit user would write for this trial; the baseline is modelled as the same recipe with
    plain AdamW (the planner has no bf16-adapter option, so its baseline figure is an approximation)."""
    from qlora_kit.recipe import recipe_from_dict

    lora = settings["lora"]
    # No checkpoints: writing them is not what is measured (and a benchmark has nothing to resume).
    train = {"max_steps": steps, "batch_size": 1, "grad_accum": 1, "logging_steps": 1, "seed": settings["seed"],
             "save_steps": 0}
    if setup.base == "baseline":
        train["optim"] = "adamw_torch"
    return recipe_from_dict({
        "model": {"name": model_name},  # never read: the weights come from random_weights()
        "lora": {"r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"]},
        "data": {"source": "synthetic", "max_length": length},
        "train": train,
        "memory": dict.fromkeys(setup.switches, True),
    }, where="benchmark recipe")


def planner_estimate(config: dict, setup: Setup, length: int, settings: dict, device: str = "cuda"):
    """The planner's estimate for one trial. On CPU: qlora_kit computes in float32 (or bf16 with --cpu-dtype), the
    baseline in bf16 autocast (its bf16=True), and TRL's loss runs without Triton."""
    from qlora_kit.plan import Architecture, estimate

    arch = Architecture.from_config(config, "bench")
    dtype = None
    if device == "cpu":
        dtype = settings.get("cpu_dtype", "float32") if setup.base == "qlora_kit" else "bfloat16"
    return estimate(arch, bench_recipe(setup, length, 1, settings), length, 1, device, dtype)


def planner_reserved_gib(config: dict, setup: Setup, length: int, settings: dict) -> float:
    return planner_estimate(config, setup, length, settings).reserved / GIB


def planner_longest(config: dict, setup: Setup, settings: dict) -> int:
    """Longest multiple of the resolution whose predicted reserved memory fits the budget (0 if none)."""
    step, budget = settings["resolution"], settings["budget_gib"]
    fits = [n for n in range(step, settings["max_len"] + 1, step)
            if planner_reserved_gib(config, setup, n, settings) <= budget]
    return max(fits, default=0)


# ----------------------------------------------------------------------------------------------------------------
# The longest-sequence search (pure: `fits(length)` runs or recalls a trial)


@dataclass
class SearchResult:
    longest: int
    """Longest length seen to fit (0: none fit)."""
    status: str
    """`found` (longest + resolution ran out of memory), `at_upper_bound`, `none_fit`, or `incomplete`."""
    probes: list[int] = field(default_factory=list)


def search_longest(fits, guess: int, step: int, upper: int, lo: int = 0, hi: int | None = None) -> SearchResult:
    """Exponential search from the planner's guess, then bisection, over multiples of `step` up to `upper`.

    `lo` / `hi`: lengths already known to fit / to run out of memory (from the fixed-length trials).
    `fits(n)` returns True, False, or None when it could not tell (error, time budget): the search stops there.
    """
    def down(n):
        return n // step * step

    probes: list[int] = []
    probe = min(max(down(guess), lo + step), upper if hi is None else hi - step)
    growth = 0.15
    while (hi is None and lo < upper) or (hi is not None and hi - lo > step):
        ok = fits(probe)
        if ok is None:
            return SearchResult(lo, "incomplete", probes)
        probes.append(probe)
        if ok:
            lo = probe
        else:
            hi = probe
        if hi is None:  # nothing has run out of memory yet: grow, faster each time
            probe = min(upper, max(lo + step, -(-int(lo * (1 + growth)) // step) * step))
            growth *= 2
        elif lo == 0:  # nothing has fitted yet: shrink, faster each time
            probe = max(step, down(int(hi / (1 + growth))))
            growth *= 2
        else:
            probe = lo + (hi - lo) // step // 2 * step
    if lo == 0:
        return SearchResult(0, "none_fit", probes)
    return SearchResult(lo, "at_upper_bound" if hi is None else "found", probes)


# ----------------------------------------------------------------------------------------------------------------
# The parent: workers, trials, the results document


class OutOfTime(Exception):
    pass


class Worker:
    """One spawned process that runs trials until one fails; `run` restarts it as needed."""

    def __init__(self, log_dir: Path, prefix: str):
        self.log_dir, self.prefix = log_dir, prefix
        self.process = self.conn = None
        self.count = 0
        self.device: dict | None = None
        self.start_s = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self, timeout: float) -> dict:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
        parent_conn, child_conn = context.Pipe()
        self.count += 1
        self.log_path = self.log_dir / f"{self.prefix}worker-{self.count}.log"
        started = time.monotonic()
        # Not a daemon: daemonic processes may not start processes of their own. If this parent dies, the worker
        # reads EOF from the pipe and exits.
        self.process = context.Process(target=worker_main, args=(child_conn, str(self.log_path)))
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        reply = self._receive(timeout)
        if reply.get("status") != "ready":
            self.stop()
            raise RuntimeError(f"the worker did not start: {reply.get('error')}\n{self.log_tail()}")
        self.start_s = time.monotonic() - started
        self.device = reply["device"]
        return reply

    def run(self, spec: dict, timeout: float) -> dict:
        started = time.monotonic()
        fresh = not self.alive
        if fresh:
            try:
                self.start(timeout)
            except RuntimeError as e:
                return {"status": "crashed", "error": str(e)}
        self.conn.send(spec)
        result = self._receive(max(1.0, timeout - (time.monotonic() - started)))
        if fresh:
            result["worker_start_s"] = round(self.start_s, 1)
        if result.get("status") != "ok" or result.get("restart"):
            self.stop()
        return result

    def _receive(self, timeout: float) -> dict:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):  # the pipe closed: the process died mid-trial
            self.process.join(5)
            reply = {"status": "crashed", "error": f"the worker died (exit code {self.process.exitcode})",
                     "log_tail": self.log_tail()}
            self.stop()
            return reply
        self.stop(kill=True)  # busy, so it would not read a polite request to stop
        return {"status": "timeout", "error": f"no answer within {timeout:.0f} s", "log_tail": self.log_tail()}

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.is_alive() and not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(15)
        if self.process.is_alive():
            self.process.kill()  # our own child, by its handle
            self.process.join(5)
        self.conn.close()
        self.process = self.conn = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Bench:
    """Runs the trials of one command and keeps the results document up to date on disk."""

    def __init__(self, args, doc: dict, out: Path):
        self.args, self.doc, self.out = args, doc, out
        self.settings = doc["settings"]
        self.started = time.monotonic()
        self.deadline = self.started + args.max_minutes * 60
        log_dir = out.with_name(out.stem + "-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(log_dir, prefix=f"run{doc['run_index']}-")

    # -- device ---------------------------------------------------------------------------------------------
    def on_gpu(self) -> bool:
        return (self.doc.get("device") or {}).get("kind") == "cuda"

    def start(self) -> None:
        reply = self.worker.start(timeout=max(60.0, self.remaining()))
        device, versions = reply["device"], reply["versions"]
        old = self.doc.get("device")
        if old and (old.get("name"), old.get("total_gib")) != (device["name"], device["total_gib"]):
            raise SystemExit(f"--resume: those results come from {old.get('name')}, this is {device['name']}")
        self.doc["device"], self.doc["versions"] = device, versions
        self.say(f"worker ready in {self.worker.start_s:.1f} s: {device['name']}, "
                 + (f"{device['total_gib']:.1f} GiB, capped at {self.settings['budget_gib']} GiB"
                    if device["kind"] == "cuda"
                    else "CPU: no cap, RSS instead of VRAM, no search")
                 + f"; torch {versions['torch']}, transformers {versions['transformers']}, trl {versions['trl']}")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # -- trials ---------------------------------------------------------------------------------------------
    def trial(self, model: str, setup: Setup, kind: str, length: int) -> dict:
        """kind: `fixed` (capped, timed), `uncapped` (the same without the cap), `search` (capped, fits or not)."""
        steps = self.settings["search_steps"] if kind == "search" else self.settings["steps"]
        warmup = 0 if kind == "search" else self.settings["warmup"]
        for record in self.doc["trials"]:  # resumed or already run in this command
            if _key(record) == (model, setup.name, kind, length):
                return record
        config = model_config(model, self.settings["smoke"])
        expected = self.expected_seconds(model, length, warmup + steps)
        if expected > self.remaining():
            raise OutOfTime(f"{model} {setup.name} {kind} {length}: expected {expected:.0f} s, "
                            f"{max(0.0, self.remaining()):.0f} s left of --max-minutes")
        spec = {"model": model, "setup": setup.name, "kind": kind, "length": length, "warmup": warmup,
                "steps": steps, "capped": kind != "uncapped", "config": config, "settings": self.settings}
        result = self.worker.run(spec, timeout=max(30.0, self.remaining() + 15))
        record = {"model": model, "setup": setup.name, "kind": kind, "length": length, "batch_size": 1,
                  "warmup": warmup, "steps": steps, "capped": spec["capped"] and self.on_gpu(),
                  **{k: v for k, v in result.items() if k not in spec}}
        self.add_planner(record, config, setup)
        self.doc["trials"].append(record)
        self.save()
        self.say(describe(record))
        if self.args.isolate:
            self.worker.stop()
        if record["status"] == "timeout":
            raise OutOfTime(f"{model} {setup.name} {length}: killed at the --max-minutes deadline")
        return record

    def expected_seconds(self, model: str, length: int, steps: int) -> float:
        """From the longest finished trial of this model: its build time plus its step time scaled to this trial."""
        done = [r for r in self.doc["trials"] if r["model"] == model and r.get("wall_s") and r["status"] == "ok"
                and r.get("run") == self.doc["run_index"]]
        startup = 0.0 if self.worker.alive else (self.worker.start_s or 15.0)
        if not done:
            return startup + 30.0  # nothing to go by: assume a short trial
        ref = max(done, key=lambda r: r["length"])
        stepping = ref["wall_s"] - ref.get("build_s", 0.0)
        return startup + ref.get("build_s", 0.0) + stepping * (length / ref["length"]) * (steps / (
            ref["warmup"] + ref["steps"]))

    def add_planner(self, record: dict, config: dict, setup: Setup) -> None:
        on_gpu = self.on_gpu()
        predicted = planner_estimate(config, setup, record["length"], self.settings, "cuda" if on_gpu else "cpu")
        record["planner_reserved_gib"] = round(predicted.reserved / GIB, 3)
        measured = record.get("peak_reserved_gib")
        record["planner_error"] = (round(predicted.reserved / GIB / measured - 1, 4) if on_gpu and measured and
                                   record["status"] == "ok" else None)  # + : the planner says more than measured
        if record.get("tensor_peak_gib"):  # CPU: live tensors (no allocator, no CUDA context) against `allocated`
            record["planner_allocated_gib"] = round(predicted.allocated / GIB, 4)
            record["planner_tensor_error"] = round(predicted.allocated / GIB / record["tensor_peak_gib"] - 1, 4)
        record["run"] = self.doc["run_index"]

    def fits(self, model: str, setup: Setup, length: int) -> bool | None:
        """Does this length train? Any finished trial at this length answers; otherwise a search trial runs."""
        for record in self.capped(model, setup):
            if record["length"] == length:
                return record["status"] == "ok"
        record = self.trial(model, setup, "search", length)
        return {"ok": True, "oom": False}.get(record["status"])

    def capped(self, model: str, setup: Setup) -> list[dict]:
        """Finished trials of this model and setup that ran under the cap (the facts the search goes by)."""
        return [r for r in self.doc["trials"] if (r["model"], r["setup"]) == (model, setup.name)
                and r["kind"] in ("fixed", "search") and r["status"] in ("ok", "oom")]

    # -- one model ----------------------------------------------------------------------------------------
    def bench(self, model: str) -> None:
        """Fixed lengths of every setup first, then the searches: if time runs out, the comparison at fixed
        lengths is complete."""
        for setup in self.args.setups:
            self.fixed_lengths(model, setup)
        for setup in self.args.setups:
            self.search(model, setup)

    def fixed_lengths(self, model: str, setup: Setup) -> None:
        oom_at = None
        for length in self.args.lengths:
            if self.broken(model, setup):  # an error is no measurement: do not spend GPU time repeating it
                self.skip(model, setup, length, "a shorter length failed with an error")
                continue
            if oom_at is None:
                record = self.trial(model, setup, "fixed", length)
                if record["status"] == "oom":
                    oom_at = length
            else:  # longer than a length that ran out of memory: it cannot fit either
                self.skip(model, setup, length, f"{oom_at} tokens already ran out of memory")
            if oom_at is not None and self.on_gpu() and not self.args.no_uncapped:
                self.trial(model, setup, "uncapped", length)

    def broken(self, model: str, setup: Setup) -> bool:
        return any((r["model"], r["setup"]) == (model, setup.name) and r["status"] in ("error", "crashed")
                   and r.get("run") == self.doc["run_index"] for r in self.doc["trials"])

    def skip(self, model: str, setup: Setup, length: int, reason: str) -> None:
        if not any(_key(r) == (model, setup.name, "fixed", length) for r in self.doc["trials"]):
            self.doc["trials"].append({"model": model, "setup": setup.name, "kind": "fixed", "length": length,
                                       "batch_size": 1, "status": "skipped", "error": reason,
                                       "run": self.doc["run_index"]})

    def search(self, model: str, setup: Setup) -> None:
        config = model_config(model, self.settings["smoke"])
        entry = {"model": model, "setup": setup.name, "budget_gib": self.settings["budget_gib"],
                 "planner_longest": planner_longest(config, setup, self.settings)}
        self.doc["longest"] = [e for e in self.doc["longest"] if (e["model"], e["setup"]) != (model, setup.name)]
        self.doc["longest"].append(entry)
        reason = ("--no-search" if self.args.no_search else "no GPU: nothing caps the memory" if not self.on_gpu()
                  else "errors at the fixed lengths (see their records)" if self.broken(model, setup) else None)
        if reason:
            entry.update(longest=None, status="skipped", reason=reason)
            self.save()
            return
        known = self.capped(model, setup)
        lo = max((r["length"] for r in known if r["status"] == "ok"), default=0)
        hi = min((r["length"] for r in known if r["status"] == "oom"), default=None)
        try:
            result = search_longest(lambda n: self.fits(model, setup, n), entry["planner_longest"],
                                    self.settings["resolution"], self.settings["max_len"], lo, hi)
        except OutOfTime:  # record how far it got, then stop the command
            done = [r["length"] for r in self.capped(model, setup) if r["status"] == "ok"]
            entry.update(longest=max(done, default=0), status="incomplete")
            self.save()
            raise
        entry.update(longest=result.longest, status=result.status, probes=result.probes)
        self.say(f"{model} {setup.name}: longest sequence {result.longest} ({result.status}; planner "
                 f"{entry['planner_longest']}; probes {result.probes})")
        self.save()

    # -- output ---------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.doc["runs"][-1]["wall_s"] = round(time.monotonic() - self.started, 1)
        self.doc["tables_markdown"] = markdown_tables(self.doc)
        write_json(self.out, self.doc)

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{int(elapsed // 60):2d}:{int(elapsed % 60):02d}] {text}", flush=True)


def _key(record: dict) -> tuple:
    return record["model"], record["setup"], record["kind"], record["length"]


def _mem(gib: float | None) -> str:
    if gib is None:
        return "?"
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def describe(record: dict) -> str:
    head = f"{record['model']} {record['setup']} {record['kind']} {record['length']}: {record['status']}"
    if record["status"] not in ("ok", "oom"):
        return f"{head} - {record.get('error', '')}\n{record.get('log_tail', '')}".rstrip()
    if "peak_reserved_gib" in record:
        parts = [head, f"peak reserved {_mem(record['peak_reserved_gib'])} "
                       f"(planner {_mem(record['planner_reserved_gib'])})"]
    elif record.get("tensor_peak_gib"):
        planner = ("" if record["setup"] == "baseline" else  # the planner plans qlora_kit runs
                   f" (planner {_mem(record['planner_allocated_gib'])}, {record['planner_tensor_error']:+.1%})")
        parts = [head, f"peak tensors {_mem(record['tensor_peak_gib'])}{planner}",
                 f"RSS {_mem(record.get('peak_rss_gib'))}"]
    else:
        parts = [head, f"peak RSS {_mem(record.get('peak_rss_gib'))}"]
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if record.get("losses"):
        parts.append(f"loss {record['losses'][-1]:.3f}")
    parts.append(f"{record.get('wall_s', 0):.0f} s")
    return ", ".join(parts)


def new_document(args, command: str) -> dict:
    return {"schema": SCHEMA, "tool": "tools/bench.py", "command": command, "timestamp": _now(),
            "settings": settings_of(args), "device": None, "versions": None, "host": host_info(),
            "git": git_revision(), "runs": [], "models": {}, "trials": [], "longest": [], "run_index": 0}


def load_resumed(path: Path, args) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA or doc.get("settings") != settings_of(args):
        raise SystemExit(f"--resume {path}: recorded with other settings ({doc.get('settings')}); "
                         f"this command has {settings_of(args)}")
    # Trials that were cut short (time, crash) run again; OOMs and successes are facts to keep.
    doc["trials"] = [r for r in doc["trials"] if r["status"] in ("ok", "oom")]
    return doc


def open_document(args, command: str) -> dict:
    """A new results document, or the resumed one, with this command added to its runs."""
    doc = load_resumed(Path(args.resume), args) if args.resume else new_document(args, command)
    doc["run_index"] = len(doc["runs"])
    doc["runs"].append({"command": command, "timestamp": _now(), "cwd": os.getcwd(), "wall_s": 0.0,
                        "stopped": None})
    for name in args.models:
        doc["models"][name] = {"config": model_config(name, args.smoke), "smoke": args.smoke}
    return doc


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
    if not args.smoke and not args.allow_cpu and not gpu_present():
        print("bench.py: no CUDA GPU here. Full-size models measure VRAM and GPU speed; on a CPU only --smoke "
              "runs (the code path on tiny models). --allow-cpu runs them anyway.", file=sys.stderr)
        return 2
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["bench", *argv])
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO / "bench" / "results" / f"{'smoke-' if args.smoke else ''}{stamp}.json")
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


# ----------------------------------------------------------------------------------------------------------------
# Tables


def merge_documents(docs: list[dict]) -> dict:
    merged = dict(docs[0])
    merged["trials"] = [r for d in docs for r in d["trials"]]
    merged["longest"] = [e for d in docs for e in d["longest"]]
    return merged


def markdown_tables(doc: dict) -> str:
    device, settings = doc.get("device") or {}, doc["settings"]
    on_gpu = device.get("kind") == "cuda"
    lora = settings["lora"]
    where = (f"{device.get('name', '?')} capped at {settings['budget_gib']} GiB" if on_gpu
             else f"CPU ({device.get('name', '?')}), no cap")
    note = (f"{where}; LoRA r {lora['r']}, alpha {lora['alpha']}, all linear layers; batch 1"
            + ("; tiny smoke models" if settings["smoke"] else ""))
    setups = list(dict.fromkeys(r["setup"] for r in doc["trials"]))
    models = list(dict.fromkeys(r["model"] for r in doc["trials"]))
    lines = []
    if doc["longest"]:
        lines += [f"**Longest trainable sequence** ({note})", "",
                  "| model | " + " | ".join(setups) + " |", "| --- |" + " ---: |" * len(setups)]
        for model in models:
            cells = [_longest_cell(next((e for e in doc["longest"] if (e["model"], e["setup"]) == (model, setup)),
                                        None)) for setup in setups]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    unit = "MiB" if settings["smoke"] else "GiB"
    memory = f"peak reserved {unit}" if on_gpu else f"peak live tensors {unit}"
    lines += [f"**Fixed lengths** ({note}; tokens/s over {settings['steps']} steps after {settings['warmup']} "
              "warm-up steps)", "",
              f"| model | setup | tokens | under the cap | {memory} | planner {unit} | planner error | tokens/s "
              "| vs baseline | loss |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lengths = sorted({r["length"] for r in doc["trials"] if r["kind"] == "fixed"})
    for model in models:
        for length in lengths:
            for setup in setups:
                row = _fixed_row(doc["trials"], model, setup, length, on_gpu, unit)
                if row:
                    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "The planner plans qlora_kit runs, so its columns are blank for the baseline (the JSON has its rough "
              "figure)." + ("" if on_gpu else " On a CPU the memory column counts live tensors (qlora_kit.tensor_peak) "
                            "and the planner's figure is its `allocated` estimate for a CPU step.")]
    if any(r["kind"] == "uncapped" and r["status"] == "ok" for r in doc["trials"]):
        lines += ["", "† measured without the cap, because this length does not fit under it: what it needs."]
    return "\n".join(lines)


def _longest_cell(entry: dict | None) -> str:
    if entry is None:
        return ""
    planner = f" (planner {entry['planner_longest']:,})" if entry["planner_longest"] else " (planner: none)"
    status = entry.get("status")
    if status == "skipped":
        return f"skipped{planner}"
    prefix = "≥ " if status in ("at_upper_bound", "incomplete") else ""
    suffix = {"incomplete": " (search incomplete)", "none_fit": " (none fit)"}.get(status, "")
    return f"{prefix}{entry.get('longest') or 0:,}{suffix}{planner}"


def _find(trials: list[dict], model: str, setup: str, kind: str, length: int) -> dict | None:
    return next((r for r in trials if _key(r) == (model, setup, kind, length)), None)


def _fixed_row(trials: list[dict], model: str, setup: str, length: int, on_gpu: bool, unit: str) -> list[str] | None:
    """One table row from the capped trial and, when that ran out of memory, the uncapped one."""
    capped = _find(trials, model, setup, "fixed", length)
    if capped is None:
        return None
    verdict = {"ok": "fits" if on_gpu else "ran", "oom": "OOM", "skipped": "OOM (shorter did)"}.get(
        capped["status"], capped["status"])
    measured, mark = capped, ""
    if capped["status"] != "ok":
        measured, mark = _find(trials, model, setup, "uncapped", length), " †"
    scale = 1024 if unit == "MiB" else 1
    figure = "planner_reserved_gib" if on_gpu else "planner_allocated_gib"  # CPU: no allocator slack, no context
    # The planner plans qlora_kit's runs; for the baseline (bf16 adapters, fp32 AdamW) it is only a rough guide.
    planner = None if setup == "baseline" else capped.get(figure, (measured or {}).get(figure))
    cells = [model, setup, f"{length:,}", verdict, "", f"{planner * scale:.2f}" if planner is not None else "",
             "", "", "", ""]
    if measured is None or measured["status"] != "ok":
        return cells
    peak = measured.get("peak_reserved_gib") if on_gpu else measured.get("tensor_peak_gib")
    cells[4] = f"{peak * scale:.2f}{mark}" if peak is not None else ""
    error = measured.get("planner_error" if on_gpu else "planner_tensor_error")
    if error is not None and setup != "baseline":
        cells[6] = f"{error:+.1%}"
    cells[7] = f"{measured['tokens_per_s']:,.0f}{mark}" if measured.get("tokens_per_s") else ""
    base = _find(trials, model, "baseline", "fixed", length)
    if base is not None and base["status"] != "ok":
        base = _find(trials, model, "baseline", "uncapped", length)
    if setup != "baseline" and base and base["status"] == "ok" and measured.get("tokens_per_s"):
        cells[8] = f"{measured['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    cells[9] = f"{measured['losses'][-1]:.3f}" if measured.get("losses") else ""
    return cells


# ----------------------------------------------------------------------------------------------------------------
# Small helpers shared by both sides


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def host_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "hostname": platform.node()}


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# ----------------------------------------------------------------------------------------------------------------
# The worker process: everything below imports torch


def worker_main(conn, log_path: str) -> None:
    """Entry point of the spawned process: answer trial specs until told to stop or a trial fails."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # the libraries' own output (and C-level prints) goes to the log, not the table
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)
    # Nothing here needs the network and the GPU box has none: without this, peft looks up config.json of the
    # (made-up) base model name on the hub and may wait for a connection timeout.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        started = time.monotonic()
        device = setup_device()
        versions = {**library_versions(), "cuda": device.pop("cuda", None), "python": platform.python_version()}
        from qlora_kit.run import quiet_libraries

        quiet_libraries()
        import trl  # noqa: F401  (import cost belongs to the start-up, not to the first trial)

        conn.send({"status": "ready", "device": device, "versions": versions,
                   "import_s": round(time.monotonic() - started, 1)})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which prints the log
        traceback.print_exc()
        conn.send({"status": "error", "error": f"{type(e).__name__}: {e}"})
        return
    baseline_allocated = _allocated()
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        print(f"\n=== {spec['model']} {spec['setup']} {spec['kind']} {spec['length']} ===", flush=True)
        result = run_trial(spec)
        leaked = _allocated() - baseline_allocated
        if result["status"] == "ok" and leaked > LEAK_TOLERANCE:
            result["restart"] = f"{leaked / GIB:.2f} GiB still allocated after the trial"
        conn.send(result)
        if result["status"] != "ok" or result.get("restart"):
            return  # the parent starts a fresh process for the next trial


def setup_device() -> dict:
    import torch

    if not torch.cuda.is_available():
        import psutil

        # Tiny smoke models gain nothing from threads, and on a busy machine OpenMP threads waiting for each other
        # make every small matmul ~50x slower.
        torch.set_num_threads(1)
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "budget_gib": None,
                "total_gib": round(psutil.virtual_memory().total / GIB, 2), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {"kind": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 2),
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def apply_cap(spec: dict) -> None:
    """GUIDE §4: the caching allocator refuses to reserve more than budget / total of the GPU (an 8 GB laptop
    card minus CUDA context and display). Set before each trial, before any of its allocations."""
    import torch

    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    budget = spec["settings"]["budget_gib"] * GIB
    if spec["capped"] and budget > total:
        raise ValueError(f"--budget-gib {spec['settings']['budget_gib']} exceeds this {total / GIB:.1f} GiB GPU")
    torch.cuda.set_per_process_memory_fraction(budget / total if spec["capped"] else 1.0, 0)


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run_trial(spec: dict) -> dict:
    """Build, train, measure; never raises. Memory figures are read even after an OOM (they show the cap)."""
    import gc
    import tempfile

    import torch

    cuda = torch.cuda.is_available()
    result = {"status": "ok"}
    started = time.monotonic()
    phase = "build"
    model = trainer = timer = None
    reports: list[str] = []
    try:
        apply_cap(spec)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory(prefix="qlora_kit-bench-") as folder:
            tokenizer = bench_tokenizer()
            with loader_reports(reports):
                model = build_model(spec)
            result["build_s"] = round(time.monotonic() - started, 2)
            if cuda:
                result["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)  # 4-bit model + LoRA
            phase = "trainer"
            timer = make_step_timer(cuda)
            trainer = build_bench_trainer(spec, model, tokenizer, Path(folder), timer)
            phase = "train"
            with tensor_peak(cuda, trainer.model) as counter:
                trainer.train()
            result.update(measurements(spec, trainer, timer))
            if counter is not None:
                result.update(tensor_figures(counter))
    except Exception as e:  # noqa: BLE001 - every failure becomes a record
        oom = isinstance(e, torch.OutOfMemoryError) or _looks_like_oom(e, reports)
        result.update(status="oom" if oom else "error", phase=phase,
                      error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500])
        if not oom:
            traceback.print_exc()
            result["traceback"] = traceback.format_exc()[-3000:]
        e.__traceback__ = None  # frames hold activations; the worker exits anyway
    result.update(memory_figures(cuda))
    if trainer is not None:
        result.update(optimizer_figures(trainer))
    result["wall_s"] = round(time.monotonic() - started, 2)
    del model, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def tensor_peak(cuda: bool, model):
    """On CPU, count live tensors op by op (qlora_kit.tensor_peak): the planner's `allocated` figure can be checked
    there too. Not on a GPU: torch.cuda's own statistics are exact there, and the counter would slow every step."""
    if cuda:
        yield None
        return
    from qlora_kit.tensor_peak import LiveTensorBytes, loss_phases

    counter = LiveTensorBytes("cpu", model)
    with loss_phases(counter), counter:
        yield counter


def tensor_figures(counter) -> dict:
    return {"tensor_peak_gib": round(counter.peak_bytes / GIB, 4),
            "tensor_start_gib": round(counter.start_bytes / GIB, 4),
            "tensor_phase_peaks_gib": {k: round(v / GIB, 4) for k, v in counter.phase_peaks.items()}}


def _looks_like_oom(error: Exception, reports: list[str] = ()) -> bool:
    """An allocation refused under the cap that does not arrive as torch.OutOfMemoryError: a cuBLAS workspace
    (CUBLAS_STATUS_ALLOC_FAILED), or an OOM inside transformers' on-the-fly quantization, which it logs in its
    load report and re-raises as a generic RuntimeError ("issues during automatic conversion of the weights")."""
    if not isinstance(error, RuntimeError):
        return False
    texts = [str(error), *(reports if "automatic conversion" in str(error) else [])]
    return any(mark in text for text in texts for mark in ("OutOfMemoryError", "out of memory",
                                                          "CUBLAS_STATUS_ALLOC_FAILED"))


@contextlib.contextmanager
def loader_reports(records: list[str]):
    """Keep transformers' warnings (its load report) while the model loads; qlora_kit silences them otherwise."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    library = logging.getLogger("transformers")
    handler, level = Keep(logging.WARNING), library.level
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


def bench_tokenizer():
    """The demo tokenizer: data are token ids already, so only its pad/eos ids matter (both below every vocab)."""
    from qlora_kit.model import load_tokenizer
    from qlora_kit.recipe import ModelSection

    return load_tokenizer(ModelSection(name=str(DEMO_TOKENIZER)))


def build_model(spec: dict):
    """The 4-bit model of this setup; see `random_weights` for where the weights come from."""
    import torch

    setup = parse_setup(spec["setup"])
    name = f"random/{spec['model']}"
    with random_weights(spec["config"], spec["settings"]["seed"]):
        if setup.base == "qlora_kit":
            from qlora_kit.model import add_lora, load_model

            recipe = bench_recipe(setup, spec["length"], spec["warmup"] + spec["steps"], spec["settings"], name)
            model = load_model(recipe, trial_precision(spec, recipe))
            return add_lora(model, recipe.lora, seed=recipe.train.seed)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        # The usual QLoRA snippet (HF blog / TRL docs): NF4, double quant, bf16 compute, one GPU.
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(name, quantization_config=quantization, dtype=torch.bfloat16,
                                                    device_map={"": 0 if torch.cuda.is_available() else "cpu"})


def trial_precision(spec: dict, recipe):
    """qlora_kit's own choice, except that `settings.cpu_dtype = "bfloat16"` runs a CPU trial under bf16 autocast
    with float32 adapters, as on a GPU: tools/calibrate_plan.py measures the planner's GPU profile that way."""
    import torch

    from qlora_kit.model import Precision, choose_precision

    if spec["settings"].get("cpu_dtype") == "bfloat16" and not torch.cuda.is_available():
        return Precision("cpu", torch.bfloat16)
    return choose_precision(recipe.quant)


_STATE_CACHE: dict[str, dict] = {}


@contextlib.contextmanager
def random_weights(config: dict, seed: int):
    """Within this block, `AutoModelForCausalLM.from_pretrained(anything, **kwargs)` builds `config`'s architecture
    through transformers' normal loader from an in-memory state dict of random bf16 tensors instead of files.

    Why this route: quantization, the 16-bit modules, the device_map and accelerate's dispatch hooks all happen in
    transformers' own code, the same code as for a downloaded checkpoint; nothing is written to disk, and the loader
    quantizes tensor by tensor (sequentially for on-the-fly quantization), so the GPU never holds a bf16 copy of the
    whole model.
    """
    from unittest import mock

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    architecture = getattr(transformers, hf_config.architectures[0])

    def from_random(location, *args, revision=None, **kwargs):
        state = random_state_dict(architecture, hf_config, config, seed)
        return architecture.from_pretrained(None, *args, config=hf_config, state_dict=state, **kwargs)

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", from_random):
        yield


def random_state_dict(architecture, hf_config, config: dict, seed: int) -> dict:
    """Random bf16 tensors for every weight: matrices ~ N(0, 0.02), norms 1, biases 0.

    Every decoder layer gets the same tensors (the loader copies them to the GPU, so the model's layers are still
    separate), and each matrix is a tiling of one random pool: an 8B model costs ~2.6 GB of RAM and a second of
    memcpy instead of minutes of random number generation. Cached per worker for the last architecture.
    """
    import re

    import torch

    key = json.dumps([config, seed], sort_keys=True)
    if key in _STATE_CACHE:
        return _STATE_CACHE[key]
    _STATE_CACHE.clear()
    with torch.device("meta"):
        skeleton = architecture(hf_config)  # names and shapes only
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(1_000_003).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)
    shared: dict[str, torch.Tensor] = {}
    state = {}
    for name, meta in skeleton.state_dict().items():
        generic = re.sub(r"\.layers\.\d+\.", ".layers.N.", name)
        if generic not in shared:
            shape = tuple(meta.shape)
            if name.endswith("bias"):
                shared[generic] = torch.zeros(shape, dtype=torch.bfloat16)
            elif len(shape) == 1:
                shared[generic] = torch.ones(shape, dtype=torch.bfloat16)  # norm weights
            else:
                n = math.prod(shape)
                shared[generic] = pool.repeat(-(-n // pool.numel()))[:n].view(shape)
        state[name] = shared[generic]
    del skeleton
    _STATE_CACHE[key] = state
    return state


def synthetic_rows(spec: dict, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, completion_mask) rows: random ids of exactly `length` tokens, the first prompt_tokens untrained."""
    import torch

    rows = spec["warmup"] + spec["steps"]
    prompt = spec["settings"]["prompt_tokens"]
    generator = torch.Generator().manual_seed(spec["settings"]["seed"] + spec["length"])
    ids = torch.randint(0, vocab, (rows, spec["length"]), generator=generator).tolist()
    mask = [[0] * prompt + [1] * (spec["length"] - prompt) for _ in range(rows)]
    return ids, mask


def build_bench_trainer(spec: dict, model, tokenizer, folder: Path, timer):
    ids, mask = synthetic_rows(spec, spec["config"]["vocab_size"])
    setup = parse_setup(spec["setup"])
    if setup.base == "qlora_kit":
        from qlora_kit.encode import Example, to_dataset
        from qlora_kit.train import build_trainer

        recipe = bench_recipe(setup, spec["length"], spec["warmup"] + spec["steps"], spec["settings"])
        examples = [Example(i, m, row) for row, (i, m) in enumerate(zip(ids, mask, strict=True))]
        return build_trainer(recipe, model, tokenizer, to_dataset(examples), None, trial_precision(spec, recipe),
                             folder, [timer])

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    lora = spec["settings"]["lora"]
    # Labels given as a column (the documented pre-tokenized format), identical to what qlora_kit's mask yields.
    labels = [[t if keep else -100 for t, keep in zip(i, m, strict=True)] for i, m in zip(ids, mask, strict=True)]
    args = SFTConfig(output_dir=str(folder / "baseline"), per_device_train_batch_size=1,
                     max_steps=spec["warmup"] + spec["steps"], report_to="none", bf16=True,
                     max_length=spec["length"], logging_steps=1, save_strategy="no", disable_tqdm=True,
                     seed=spec["settings"]["seed"], use_cpu=not torch.cuda.is_available())  # CPU: smoke only
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])


def make_step_timer(cuda: bool):
    """A TrainerCallback, defined here so that the parent process never imports transformers."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, optimizer), with the GPU's queue drained at both
        ends; data loading happens before on_step_begin, logging after on_step_end."""

        def __init__(self, cuda: bool):
            self.cuda, self.times, self._start = cuda, [], 0.0

        def _sync(self):
            if self.cuda:
                import torch

                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer(cuda)


def measurements(spec: dict, trainer, timer) -> dict:
    from qlora_kit.model import count_parameters

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = timer.times[spec["warmup"]:]
    trainable, total = count_parameters(trainer.model)
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()
                             if p.requires_grad})
    optim = trainer.args.optim  # a transformers enum: sent as text, the parent must not need transformers
    return {"steps_done": trainer.state.global_step, "step_s": [round(t, 4) for t in timer.times],
            "tokens_per_s": round(spec["length"] * len(timed) / sum(timed), 1) if timed else None,
            "losses": [round(v, 4) for v in losses], "trainable_params": trainable, "total_params": total,
            "adapter_dtype": ",".join(adapter_dtypes), "optimizer": str(getattr(optim, "value", optim)),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def memory_figures(cuda: bool) -> dict:
    if cuda:
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                # Whole device, at the end: CUDA context, managed (paged) memory, and any other process included.
                "device_used_gib": round((total - free) / GIB, 3)}
    import resource

    import psutil

    # ru_maxrss is the worker's lifetime peak (KiB on Linux): the first trial in a worker is exact, later ones
    # are upper bounds. Smoke only; on a GPU the VRAM figures above are what counts.
    return {"rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}


def optimizer_state_bytes(trainer) -> tuple[str, int, int] | None:
    """(optimizer class, bytes in PyTorch's allocator, bytes in bitsandbytes' paged CUDA managed memory)."""
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        return None
    allocated = paged = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "nbytes"):
                if getattr(value, "is_paged", False):
                    paged += value.nbytes
                else:
                    allocated += value.nbytes
    return type(inner).__name__, allocated, paged


def optimizer_figures(trainer) -> dict:
    """Optimizer state size, split into PyTorch-allocated and bitsandbytes-paged (CUDA managed) memory."""
    sizes = optimizer_state_bytes(trainer)
    if sizes is None:
        return {}
    name, allocated, paged = sizes
    return {"optimizer_class": name, "optimizer_state_gib": round(allocated / GIB, 4),
            "paged_optimizer_gib": round(paged / GIB, 4)}


if __name__ == "__main__":
    sys.exit(main())
