"""The parent process: runs one command's trials in a worker, keeps the results document up to date on disk."""

from __future__ import annotations

import time
from pathlib import Path

from qlora_kit.bench.counts import add_full_depth
from qlora_kit.bench.document import write_json
from qlora_kit.bench.search import search_longest
from qlora_kit.bench.setups import (
    GIB,
    PROTOCOL_SPEED_LENGTH,
    PROTOCOL_SPEED_MAX,
    Setup,
    model_config,
    planner_estimate,
    planner_longest,
)
from qlora_kit.bench.tables import _key, describe, markdown_tables
from qlora_kit.bench.worker import Worker


class OutOfTime(Exception):
    pass


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
    def trial(self, model: str, setup: Setup, kind: str, length: int, layers: int | None = None) -> dict:
        """kind: `fixed` (capped, timed), `uncapped` (the same without the cap), `search` (capped, fits or not),
        `count` (CPU: live tensors of a `layers`-deep model with the real layer dimensions, no arithmetic)."""
        steps = self.settings["search_steps"] if kind == "search" else self.settings["steps"]
        warmup = 0 if kind == "search" else self.settings["warmup"]
        for record in self.doc["trials"]:  # resumed or already run in this command
            if _key(record) == (model, setup.name, kind, length) and record.get("layers") == layers:
                return record
        config = model_config(model, self.settings["smoke"], layers)
        expected = self.expected_seconds(model, length, warmup + steps)
        if expected > self.remaining():
            raise OutOfTime(f"{model} {setup.name} {kind} {length}: expected {expected:.0f} s, "
                            f"{max(0.0, self.remaining()):.0f} s left of --max-minutes")
        spec = {"model": model, "setup": setup.name, "kind": kind, "length": length, "warmup": warmup,
                "steps": steps, "capped": kind != "uncapped", "config": config, "settings": self.settings}
        result = self.worker.run(spec, timeout=max(30.0, self.remaining() + 15))
        record = {"model": model, "setup": setup.name, "kind": kind, "length": length, "batch_size": 1,
                  **({"layers": layers} if layers is not None else {}), "warmup": warmup, "steps": steps,
                  "capped": spec["capped"] and self.on_gpu(),
                  **{k: v for k, v in result.items() if k not in spec}}
        self.add_planner(record, config, setup)
        if layers is not None:
            add_full_depth(record, model_config(model, self.settings["smoke"]), setup, self.settings)
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
                and r.get("run") == self.doc["run_index"] and r["kind"] != "count"]
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
        lengths is complete. With --count: the live-tensor counts instead (CPU, no timing, no search)."""
        if self.args.protocol:
            self.protocol(model)
            return
        if self.settings.get("count_layers"):
            for length in self.args.lengths:  # every setup at a length before the next: a stopped run compares
                for setup in self.args.setups:
                    for layers in self.settings["count_layers"]:
                        self.trial(model, setup, "count", length, layers)
            return
        for setup in self.args.setups:
            self.fixed_lengths(model, setup)
        for setup in self.args.setups:
            self.search(model, setup)

    def protocol(self, model: str) -> None:
        """--protocol, in the order of value: the longest sequence that trains under the cap for each setup (qlora_kit
        with its switches first), then tokens/s of every setup at one length, the same for all: the shortest of
        their longest sequences (at most PROTOCOL_SPEED_MAX), or PROTOCOL_SPEED_LENGTH where one fits none. A setup
        that does not fit that length under the cap runs it without the cap (†). The planner's error is recorded
        at every trial. On a CPU (--smoke) the searches are skipped and the speed runs at the longest --lengths."""
        for setup in self.args.setups:
            self.search(model, setup)
        longest = {e["setup"]: e.get("longest") for e in self.doc["longest"] if e["model"] == model}
        found = [longest.get(s.name) for s in self.args.setups]
        if not self.on_gpu():
            length = self.args.lengths[-1]
        elif all(found):
            length = min(min(found) // self.settings["resolution"] * self.settings["resolution"], PROTOCOL_SPEED_MAX)
        else:
            length = PROTOCOL_SPEED_LENGTH
        for setup in self.args.setups:
            if not self.on_gpu() or (longest.get(setup.name) or 0) >= length:
                self.trial(model, setup, "fixed", length)
            else:
                self.skip(model, setup, length, f"the search found nothing longer than {longest.get(setup.name)} "
                          "tokens that fits")
                self.trial(model, setup, "uncapped", length)

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
