"""tools/bench.py: the real smoke run on CPU (both setups train), the search, and the GPU-only bookkeeping
(OOM under the cap, uncapped re-runs, resuming) driven by a fake worker, so it is checked without a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REPO

BENCH = REPO / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    """The package's parts under one name, as the tests use them."""
    from qlora_kit.bench import cli, document, runner, search, setups, worker

    return SimpleNamespace(search_longest=search.search_longest, parse_args=cli.parse_args, main=cli.main,
                           open_document=document.open_document,
                           Bench=runner.Bench, parse_setup=setups.parse_setup, bench_recipe=setups.bench_recipe,
                           settings_of=setups.settings_of, _looks_like_oom=worker._looks_like_oom)


# -- the real thing, on CPU ---------------------------------------------------------------------------------------


def run_bench(tmp_path_factory, name, *argv):
    out = tmp_path_factory.mktemp("bench") / f"{name}.json"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(BENCH), *argv, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8")), done.stdout, time.monotonic() - started


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    """The GPU protocol's CPU rehearsal: the same command and code path on a tiny Llama 3.1 (the count below runs
    the Qwen2 family)."""
    return run_bench(tmp_path_factory, "protocol-smoke", "--protocol", "--smoke", "--models", "r1-distill-llama-8b",
                     "--warmup", "0", "--steps", "1")


@pytest.fixture(scope="module")
def count_trials():
    """Count trials of the smoke models in this process (the worker's own function), 2 layers, 128 tokens: the
    baseline and qlora_kit counted without arithmetic as --count does, and qlora_kit again with the arithmetic."""
    from qlora_kit.bench.cli import parse_args
    from qlora_kit.bench.setups import model_config, settings_of
    from qlora_kit.bench.worker import run_trial
    from qlora_kit.console import quiet_libraries

    quiet_libraries()
    settings = settings_of(parse_args(["--count", "--smoke"]))
    assert settings["no_arithmetic_min_elements"] == 4096  # low enough that the smoke's activations are skipped too

    def count(setup, arithmetic=False):
        spec = {"model": "r1-distill-qwen-1.5b", "setup": setup, "kind": "count", "length": 128, "warmup": 0,
                "steps": 2, "capped": False, "config": model_config("r1-distill-qwen-1.5b", True, 2),
                "settings": {**settings, "no_arithmetic_min_elements": None} if arithmetic else settings}
        result = run_trial(spec)
        assert result["status"] == "ok", result
        return result

    return {"baseline": count("baseline"), "qlora_kit": count("qlora_kit"),
            "with arithmetic": count("qlora_kit", arithmetic=True)}


@pytest.mark.slow  # the bench command in fresh processes
def test_full_size_models_without_a_gpu_are_refused(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU probe runs in a child process, which inherits it
    assert bench.main(["--models", "r1-distill-qwen-7b", "--out", str(tmp_path / "x")]) == 2
    assert "only --smoke" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow  # the bench command in fresh processes
def test_smoke_writes_the_documented_schema(smoke_result):
    doc, _, _ = smoke_result
    for key in ("schema", "command", "timestamp", "settings", "device", "versions", "host", "runs", "models",
                "trials", "longest", "tables_markdown"):
        assert key in doc, key
    assert "--smoke" in doc["command"] and "--protocol" in doc["command"]
    assert doc["device"]["kind"] == "cpu"
    for library in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        assert doc["versions"][library], library
    assert "cuda" in doc["versions"]
    assert doc["settings"]["budget_gib"] == 7.0 and doc["settings"]["lora"] == {"r": 32, "alpha": 64, "dropout": 0.0}
    assert doc["settings"]["protocol"] and doc["settings"]["cpu_dtype"] == "bfloat16"
    assert doc["runs"][0]["stopped"] is None


@pytest.mark.slow  # the bench command in fresh processes
def test_protocol_rehearsal_trains_both_setups(smoke_result):
    doc, _, _ = smoke_result
    fixed = [r for r in doc["trials"] if r["kind"] == "fixed"]
    switches = "qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp"
    # qlora_kit with its switches first: on a GPU its search is what the 9 minutes are for.
    assert [(r["model"], r["setup"]) for r in fixed] == [("r1-distill-llama-8b", s) for s in (switches, "baseline")]
    for r in fixed:
        assert r["status"] == "ok" and r["length"] == 128, r
        assert r["steps_done"] == r["warmup"] + r["steps"] == 1
        assert r["losses"] and all(math.isfinite(v) for v in r["losses"]), r
        assert r["tokens_per_s"] > 0
        assert r["peak_rss_gib"] > 0 and r["planner_reserved_gib"] > 0
        assert r["planner_error"] is None  # the planner is about VRAM; no error figure against RAM
        assert r["tensor_peak_gib"] > r["tensor_start_gib"] > 0  # live tensors counted op by op instead
    by_setup = {r["setup"]: r for r in fixed}
    # The same LoRA in both setups; qlora_kit keeps the adapter in float32, TRL's default casts it to bfloat16.
    assert by_setup["baseline"]["trainable_params"] == by_setup[switches]["trainable_params"]
    assert by_setup[switches]["adapter_dtype"] == "float32"
    assert by_setup["baseline"]["adapter_dtype"] == "bfloat16"


@pytest.mark.slow  # the bench command in fresh processes
def test_smoke_skips_the_search_on_cpu_and_prints_the_tables(smoke_result):
    doc, stdout, seconds = smoke_result
    assert doc["longest"] and all(e["status"] == "skipped" for e in doc["longest"])
    assert all(e["planner_longest"] > 0 for e in doc["longest"])
    assert "| r1-distill-llama-8b | baseline | 128 | ran |" in stdout
    assert doc["tables_markdown"] in stdout
    assert seconds < 120, f"smoke took {seconds:.0f} s"


@pytest.mark.slow  # real training steps
def test_a_count_without_arithmetic_equals_the_count_with_it(count_trials):
    """The whole trial (bitsandbytes' NF4 layers, LoRA, TRL's chunked loss, 8-bit AdamW) counted with and without
    the arithmetic: the same peak in every phase, to the byte; only the values differ."""
    counted, real = count_trials["qlora_kit"], count_trials["with arithmetic"]
    assert (real["tensor_peak_bytes"], real["tensor_phase_peaks_bytes"]) == (
        counted["tensor_peak_bytes"], counted["tensor_phase_peaks_bytes"])
    assert real["losses"] and all(math.isfinite(v) for v in real["losses"])
    assert counted["tokens_per_s"] is None and counted["losses"] == []  # no values, no speed


@pytest.mark.slow  # real training steps
def test_under_bf16_autocast_the_smoke_setups_differ_by_the_adapter_only(count_trials):
    """The smoke's old 21.1 vs 16.0 MiB was qlora_kit in float32 against the baseline in bf16. Under bf16 autocast
    for both, the peak is TRL's loss in both (its [tokens, 32768] tile is allocated whole even for this 1,024-token
    vocabulary), and qlora_kit's extra is its float32 adapter: under 1 MiB here."""
    base, ours = count_trials["baseline"], count_trials["qlora_kit"]
    for trial in (base, ours):
        assert max(trial["tensor_phase_peaks_bytes"], key=trial["tensor_phase_peaks_bytes"].get) == "loss backward"
    assert 0 < ours["tensor_peak_bytes"] - base["tensor_peak_bytes"] < 1024**2
    assert (base["adapter_dtype"], ours["adapter_dtype"]) == ("bfloat16", "float32")
    assert ours["optimizer"] == "paged_adamw_8bit"  # --count stands for a GPU step: qlora_kit's GPU optimizer


def test_count_refuses_switches_that_do_nothing_on_a_cpu(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--count", "--setups", "baseline,qlora_kit+offload_activations"])
    args = bench.parse_args(["--count"])
    assert [s.name for s in args.setups] == ["baseline", "qlora_kit", "qlora_kit+tiled_mlp"]
    assert args.count_layers == [1, 2] and args.lengths == [1024, 2048, 4096] and args.no_search


def test_protocol_defaults(bench):
    args = bench.parse_args(["--protocol"])
    assert args.models == ["r1-distill-llama-8b", "r1-distill-qwen-7b", "r1-distill-qwen-1.5b"]
    assert [s.name for s in args.setups] == ["qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp", "baseline"]
    assert args.max_minutes == 8.5 and args.budget_gib == 7.0


# -- the search ---------------------------------------------------------------------------------------------------


# (true limit, planner's guess, most probes allowed): each probe is a GPU trial, so a good guess must pay off.
@pytest.mark.parametrize("limit, guess, most", [(5000, 4000, 6), (3000, 2900, 3), (5000, 9000, 7), (300, 8192, 8),
                                                 (20000, 256, 14), (4096, 4096, 3)])
def test_search_finds_the_longest_multiple_of_the_step(bench, limit, guess, most):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    result = bench.search_longest(fits, guess, 256, 32768)
    assert result.longest == limit // 256 * 256
    assert result.status == "found"
    assert len(tried) == len(set(tried)) and all(n % 256 == 0 for n in tried)
    assert len(tried) <= most


def test_search_reports_none_fit_upper_bound_and_incomplete(bench):
    assert bench.search_longest(lambda n: False, 4096, 256, 32768).status == "none_fit"
    top = bench.search_longest(lambda n: True, 4096, 256, 8192)
    assert (top.longest, top.status) == (8192, "at_upper_bound")
    cut = bench.search_longest(lambda n: None if n > 1024 else True, 1024, 256, 8192)
    assert (cut.longest, cut.status) == (1024, "incomplete")


def test_search_starts_from_known_bounds(bench):
    tried = []
    result = bench.search_longest(lambda n: tried.append(n) or n <= 3000, 0, 256, 32768, lo=2048, hi=4096)
    assert result.longest == 2816 and all(2048 < n < 4096 for n in tried)


# -- GPU bookkeeping with a fake worker ---------------------------------------------------------------------------


class FakeGPUWorker:
    """Trains iff the length is at most `limit` under the cap; always without it."""

    alive, start_s = True, 0.0

    def __init__(self, limit: int, broken: str = ""):
        self.limit, self.broken, self.specs = limit, broken, []

    def start(self, timeout):
        return {"status": "ready", "device": {"kind": "cuda", "name": "Fake GPU", "total_gib": 79.2},
                "versions": {"torch": "t", "transformers": "x", "trl": "y", "cuda": "12.8"}}

    def run(self, spec, timeout):
        self.specs.append(spec)
        need = 4.0 + spec["length"] / 1024
        if spec["setup"] == self.broken:
            return {"status": "error", "error": "RuntimeError: You can't move a model ...", "wall_s": 1.0}
        if spec["capped"] and spec["length"] > self.limit:
            return {"status": "oom", "error": "OutOfMemoryError: ...", "peak_reserved_gib": 7.0, "wall_s": 1.0}
        return {"status": "ok", "peak_reserved_gib": need, "tokens_per_s": 1000.0 + spec["length"],
                "losses": [11.9, 11.8], "wall_s": 1.0, "build_s": 0.5}

    def stop(self, kill=False):
        pass


def run_fake(bench, tmp_path, argv, limit, resume=None, broken=""):
    setups = [] if "--setups" in argv else ["--setups", "baseline,qlora_kit"]
    args = bench.parse_args(["--models", "r1-distill-qwen-7b", "--out", str(tmp_path / "gpu.json"), *setups, *argv]
                            + (["--resume", str(resume)] if resume else []))
    doc = bench.open_document(args, "bench test")
    runner = bench.Bench(args, doc, tmp_path / "gpu.json")
    runner.worker = FakeGPUWorker(limit, broken)
    runner.start()
    runner.bench("r1-distill-qwen-7b")
    runner.save()
    return doc, runner.worker.specs


def test_gpu_flow_oom_uncapped_rerun_search_and_table(bench, tmp_path):
    doc, specs = run_fake(bench, tmp_path, ["--lengths", "1024,2048,4096"], limit=1500)
    fixed = {(r["setup"], r["length"]): r for r in doc["trials"] if r["kind"] == "fixed"}
    assert fixed[("qlora_kit", 1024)]["status"] == "ok"
    assert fixed[("qlora_kit", 2048)]["status"] == "oom"
    assert fixed[("qlora_kit", 4096)]["status"] == "skipped"  # longer than an OOM: not run under the cap
    uncapped = {(r["setup"], r["length"]) for r in doc["trials"] if r["kind"] == "uncapped"}
    assert uncapped == {(s, n) for s in ("baseline", "qlora_kit") for n in (2048, 4096)}
    assert all(not s["capped"] for s in specs if s["kind"] == "uncapped")
    longest = {e["setup"]: e for e in doc["longest"]}
    assert longest["qlora_kit"]["longest"] == 1280 and longest["qlora_kit"]["status"] == "found"
    # Every capped length is tried at most once per setup (the search reuses the fixed-length outcomes).
    capped = [(s["setup"], s["length"]) for s in specs if s["capped"]]
    assert len(capped) == len(set(capped))
    ok = fixed[("qlora_kit", 1024)]
    assert ok["planner_error"] == pytest.approx(ok["planner_reserved_gib"] / ok["peak_reserved_gib"] - 1, abs=1e-3)
    table = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))["tables_markdown"]
    assert "| r1-distill-qwen-7b | qlora_kit | 2,048 | OOM | 6.00 †" in table
    assert "| r1-distill-qwen-7b | qlora_kit | 4,096 | OOM (shorter did) | 8.00 †" in table
    assert "1,280 (planner" in table and "1.00x" in table


class FakeProtocolGPU(FakeGPUWorker):
    """Each setup has its own longest sequence under the cap (0: none fits)."""

    def __init__(self, limits: dict[str, int]):
        super().__init__(0)
        self.limits = limits

    def run(self, spec, timeout):
        self.limit = self.limits[spec["setup"]]
        return super().run(spec, timeout)


def test_protocol_searches_first_then_times_both_at_one_length(bench, tmp_path):
    switches = "qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp"
    args = bench.parse_args(["--protocol", "--models", "r1-distill-llama-8b", "--out", str(tmp_path / "p.json")])
    doc = bench.open_document(args, "bench test")
    runner = bench.Bench(args, doc, tmp_path / "p.json")
    runner.worker = FakeProtocolGPU({switches: 5000, "baseline": 0})
    runner.start()
    runner.bench("r1-distill-llama-8b")
    kinds = [(s["setup"], s["kind"]) for s in runner.worker.specs]
    first_baseline = kinds.index(("baseline", "search"))
    assert all(k == (switches, "search") for k in kinds[:first_baseline])  # the most valuable search first
    assert kinds[-2:] == [(switches, "fixed"), ("baseline", "uncapped")]  # then the speed of both, one length
    longest = {e["setup"]: e for e in doc["longest"]}
    assert (longest[switches]["longest"], longest[switches]["status"]) == (4864, "found")
    assert longest["baseline"]["status"] == "none_fit"
    timed = [r for r in doc["trials"] if r["kind"] in ("fixed", "uncapped") and r["status"] == "ok"]
    assert {r["length"] for r in timed} == {1024} and all(r["planner_reserved_gib"] > 0 for r in timed)
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))["trials"] == doc["trials"]  # on disk
    # Both fit somewhere: the speed runs under the cap at the shorter of the two longest sequences.
    args = bench.parse_args(["--protocol", "--models", "r1-distill-llama-8b", "--out", str(tmp_path / "q.json")])
    doc = bench.open_document(args, "bench test")
    runner = bench.Bench(args, doc, tmp_path / "q.json")
    runner.worker = FakeProtocolGPU({switches: 9000, "baseline": 2100})
    runner.start()
    runner.bench("r1-distill-llama-8b")
    assert [(s["setup"], s["kind"], s["length"]) for s in runner.worker.specs][-2:] == [
        (switches, "fixed", 2048), ("baseline", "fixed", 2048)]


def test_resume_reuses_finished_trials(bench, tmp_path):
    first, _ = run_fake(bench, tmp_path, ["--lengths", "1024"], limit=1500)
    previous = tmp_path / "first.json"
    previous.write_text((tmp_path / "gpu.json").read_text(encoding="utf-8"), encoding="utf-8")
    second, specs = run_fake(bench, tmp_path, ["--lengths", "1024"], limit=1500, resume=previous)
    assert specs == []  # nothing ran again
    assert len(second["runs"]) == 2 and len(second["trials"]) == len(first["trials"])
    with pytest.raises(SystemExit):
        run_fake(bench, tmp_path, ["--lengths", "1024", "--steps", "9"], limit=1500, resume=previous)


def test_the_default_setups_include_every_memory_switch(bench):
    assert [s.name for s in bench.parse_args([]).setups] == [
        "baseline", "qlora_kit", "qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp"]
    assert [s.name for s in bench.parse_args(["--smoke"]).setups] == ["baseline", "qlora_kit"]


def test_setups_and_memory_switches(bench):
    assert bench.parse_setup("qlora_kit+embeddings_on_cpu+offload_activations").name == \
        "qlora_kit+offload_activations+embeddings_on_cpu"
    assert bench.parse_setup("qlora_kit", ["embeddings_on_cpu"]).switches == ("embeddings_on_cpu",)
    for bad in ("baseline+offload_activations", "unsloth", "qlora_kit+fast"):
        with pytest.raises(ValueError):
            bench.parse_setup(bad)
    recipe = bench.bench_recipe(bench.parse_setup("qlora_kit+offload_activations"), 2048, 6,
                                bench.settings_of(bench.parse_args([])))
    assert recipe.memory.offload_activations and not recipe.memory.embeddings_on_cpu
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.train.grad_accum) == (32, 64, 0.0, 1)


def test_a_setup_that_errors_is_not_retried_at_every_length(bench, tmp_path):
    setups = "baseline,qlora_kit+embeddings_on_cpu"
    doc, specs = run_fake(bench, tmp_path, ["--lengths", "1024,2048", "--setups", setups], limit=1500,
                          broken="qlora_kit+embeddings_on_cpu")
    tried = [(s["kind"], s["length"]) for s in specs if s["setup"] == "qlora_kit+embeddings_on_cpu"]
    assert tried == [("fixed", 1024)]
    longest = {e["setup"]: e for e in doc["longest"]}
    assert longest["qlora_kit+embeddings_on_cpu"]["status"] == "skipped"
    assert longest["baseline"]["status"] == "found"
    assert "| r1-distill-qwen-7b | qlora_kit+embeddings_on_cpu | 1,024 | error |" in doc["tables_markdown"]


def test_an_oom_inside_transformers_quantization_is_still_an_oom(bench):
    wrapped = RuntimeError("We encountered some issues during automatic conversion of the weights. For details ...")
    assert bench._looks_like_oom(wrapped, ["... torch.OutOfMemoryError: CUDA out of memory. Tried to allocate ..."])
    assert not bench._looks_like_oom(wrapped, ["KeyError: 'weight'"])
    assert bench._looks_like_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not bench._looks_like_oom(ValueError("out of memory"))


@pytest.mark.slow  # the bench command in fresh processes
def test_show_skips_files_that_are_not_bench_results(bench, smoke_result, tmp_path, capsys):
    doc, _, _ = smoke_result
    (tmp_path / "smoke.json").write_text(json.dumps(doc), encoding="utf-8")
    (tmp_path / "calibration.json").write_text(json.dumps({"tool": "tools/calibrate_plan.py", "points": []}),
                                               encoding="utf-8")
    assert bench.main(["--show", str(tmp_path / "calibration.json"), str(tmp_path / "smoke.json")]) == 0
    out, err = capsys.readouterr()
    assert "| r1-distill-llama-8b | baseline | 128 | ran |" in out
    assert "skipping" in err and "calibration.json" in err
    assert bench.main(["--show", str(tmp_path / "calibration.json")]) == 2


class FakeCountWorker(FakeGPUWorker):
    """A CPU worker whose peak grows by a fixed amount per layer (what a checkpointed model does)."""

    def start(self, timeout):
        return {"status": "ready", "device": {"kind": "cpu", "name": "Fake CPU", "total_gib": 16.0},
                "versions": {"torch": "t", "transformers": "x", "trl": "y", "cuda": None}}

    def run(self, spec, timeout):
        self.specs.append(spec)
        layers = spec["config"]["num_hidden_layers"]
        peak = (1000 + 10 * layers) * 1024**2 + spec["length"] * 1024 + (512 if spec["setup"] == "qlora_kit" else 0)
        return {"status": "ok", "tensor_peak_bytes": peak, "tensor_peak_gib": peak / 1024**3,
                "tensor_start_bytes": 1, "tensor_phase_peaks_bytes": {"backward": peak - 5, "loss backward": peak},
                "tokens_per_s": None, "losses": [], "wall_s": 1.0, "build_s": 0.5}


def test_count_derives_the_full_depth_from_two_depths(bench, tmp_path):
    from qlora_kit.bench.counts import count_table, full_depth_rows

    args = bench.parse_args(["--count", "--models", "r1-distill-llama-8b", "--lengths", "1024",
                             "--setups", "baseline,qlora_kit", "--out", str(tmp_path / "c.json")])
    doc = bench.open_document(args, "bench test")
    runner = bench.Bench(args, doc, tmp_path / "c.json")
    runner.worker = FakeCountWorker(0)
    runner.start()
    runner.bench("r1-distill-llama-8b")
    assert [(s["setup"], s["config"]["num_hidden_layers"]) for s in runner.worker.specs] == [
        ("baseline", 1), ("baseline", 2), ("qlora_kit", 1), ("qlora_kit", 2)]
    assert all(s["config"]["vocab_size"] == 128256 and s["config"]["hidden_size"] == 4096 for s in runner.worker.specs)
    rows = {row["setup"]: row for row in full_depth_rows(doc["trials"])}
    expected = ((1000 + 10 * 32) * 1024**2 + 1024 * 1024) / 1024**3  # 2 layers + 30 more at 10 MiB each
    assert rows["baseline"]["full_depth_gib"] == pytest.approx(expected)
    assert rows["baseline"]["measured_per_layer_gib"] * 1024 == pytest.approx(10)
    assert rows["qlora_kit"]["full_depth_vs_baseline"] == pytest.approx(1, abs=1e-6)
    deep = next(r for r in doc["trials"] if (r["setup"], r["layers"]) == ("qlora_kit", 2))
    assert deep["full_layers"] == 32 and deep["planner_per_layer_gib"] > 0  # the planner's per-layer terms
    table = "\n".join(count_table(doc["trials"]))
    assert "| r1-distill-llama-8b | 1,024 | qlora_kit | 0.987 | 0.997 | 10.0 / " in table and "(32 layers)" in table
