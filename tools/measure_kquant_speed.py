"""Our GGUF quantize step against llama.cpp's `llama-quantize`, side by side: the same model, the same threads.

    python tools/measure_kquant_speed.py --llama-quantize PATH [--types q4_k_m,q5_k_m,q6_k,q3_k_m] [--repeats 3]
        [--threads N] [--perplexity] [--old-rev REV] [--json bench/results/kquant_speed.json]

PATH is llama.cpp's llama-quantize (default $LLAMA_QUANTIZE); without it the tool says so and stops (exit 0).

The model: random f16 weights at R1-Distill-Qwen-1.5B's row shapes (hidden 1536, intermediate 8960, vocabulary
151936), 4 layers: 654 M parameters, a merged folder as `qlora_kit.merge` writes one. Ours is the export of that
folder (`export_gguf(folder, out, type)`: read the safetensors, the tokenizer, quantize, write the file), timed
inside a child process with NUMBA_NUM_THREADS (and torch's threads) set to N, the libraries it uses imported
before the clock starts and the kernels already compiled (numba's on-disk cache, as for every export after a
user's first); the child's whole wall time, interpreter and imports included, is reported beside it.
llama-quantize's input is the same folder exported by us as f16 GGUF; it runs as `llama-quantize IN OUT TYPE N`,
timed as a process. The two alternate, `--repeats` times
each per type; the medians and their ratio are reported, with the load average before each run (the machine
may be shared: timings under load are noisy, and the interleaving keeps that noise fair to both). Also:
whether every tensor of our file equals llama-quantize's byte for byte, and numba's compile time, cold
(an empty cache: what a fresh install pays once) and from the cache, measured in fresh processes.

--perplexity: llama-perplexity (beside llama-quantize) on the q4_k_m files, over text from the medical rows in
shared/fixtures, for ours, llama-quantize's, and, with --old-rev, the quantizers of that git revision (the numpy
port this tool was written to replace: its kquants.py loaded from git, gguf.quants for the 32-weight types), on
this random model and on SmolLM2-135M-Instruct (a real model) where its folder exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = REPO.parent / "shared" / "fixtures"
SHAPE = dict(hidden=1536, intermediate=8960, layers=4, heads=12, kv=2, vocab=151936)  # R1-Distill-Qwen-1.5B's rows
TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def make_model(folder: Path) -> Path:
    """Random f16 weights (N(0, 0.02), seeded) at the 1.5B's row shapes, one safetensors file, the R1 tokenizer."""
    sys.path.insert(0, str(REPO / "tools"))
    from measure_gguf import random_qwen2

    return random_qwen2(folder, SHAPE, "float16")


# The child that runs our export: prints the seconds of the export_gguf call itself (imports excluded). With
# OLD_REV, the quantizers of that revision replace ours (K types from its kquants.py, the rest gguf.quants).
EXPORT_CHILD = r"""
import importlib.util, json, os, sys, time
sys.path.insert(0, REPO)
import numpy as np
from qlora_kit.gguf import quantize as kquants  # the entry point encode_tensor calls
if OLD:
    import gguf
    spec = importlib.util.spec_from_file_location("old_kquants", OLD)
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    def quantize_k(data, qtype, importance=None, threads=None, out=None):
        if qtype in old.QUANTIZERS:
            packed = old.quantize_k(data, qtype)
        else:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        if out is not None:
            out[...] = packed
        return packed
    kquants.quantize_k = quantize_k
from qlora_kit.gguf.export import export_gguf
import gguf, safetensors, torch, transformers  # what the export imports on its way: library load, not its work
started = time.monotonic()
result = export_gguf(FOLDER, OUT, TYPE, modelfile=False, overwrite=True, log=lambda *_: None)
print(json.dumps({"export_s": time.monotonic() - started, "bytes": result.size_bytes}))
"""


def child_env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1"}


def ours(folder: Path, out: Path, ft: str, threads: int, old: Path | None = None) -> dict:
    code = "\n".join([f"REPO = {str(REPO)!r}", f"FOLDER = {str(folder)!r}", f"OUT = {str(out)!r}", f"TYPE = {ft!r}",
                      f"OLD = {str(old) if old else ''!r}", EXPORT_CHILD])
    before = load()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(threads),
                          timeout=7200)
    if done.returncode:
        sys.exit(f"our export failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"export_s": round(row["export_s"], 2), "process_s": round(time.monotonic() - started, 2),
            "bytes": row["bytes"], "load_before": before}


def llama_quantize(tool: Path, source: Path, out: Path, ft: str, threads: int) -> dict:
    before = load()
    started = time.monotonic()
    done = subprocess.run([str(tool), str(source), str(out), ft.upper(), str(threads)], capture_output=True,
                          text=True, timeout=7200)
    seconds = time.monotonic() - started
    if done.returncode:
        sys.exit(f"llama-quantize failed:\n{done.stderr[-3000:]}")
    found = re.search(r"quantize time =\s*([0-9.]+) ms", done.stdout + done.stderr)
    return {"process_s": round(seconds, 2), "quantize_s": round(float(found.group(1)) / 1000, 2) if found else None,
            "bytes": out.stat().st_size, "load_before": before}


def same_tensors(a: Path, b: Path) -> dict:
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    different = sorted(n for n in ta if n not in tb or ta[n].tensor_type != tb[n].tensor_type
                       or ta[n].data.tobytes() != tb[n].data.tobytes())
    return {"tensors": len(ta), "identical": len(ta) - len(different), "different": different[:10],
            "types": sorted({t.tensor_type.name for t in ta.values()})}


COMPILE_CHILD = r"""
import json, sys, time
sys.path.insert(0, REPO)
import numpy as np
started = time.monotonic()
from qlora_kit.gguf.kquants import BLOCK
from qlora_kit.gguf.quantize import quantize_k
times = {"import_s": time.monotonic() - started}
x = np.random.default_rng(0).normal(0, 0.02, (4, 512)).astype(np.float32)
for qtype in BLOCK:
    for importance in (None, np.ones(512, np.float32)):
        t = time.monotonic()
        quantize_k(x, qtype, importance)
        times.setdefault(qtype, 0.0)
        times[qtype] += time.monotonic() - t
print(json.dumps(times))
"""


def compile_times(threads: int) -> dict:
    """numba's compile time per type (both forms), cold (empty cache) and from the cache, in fresh processes."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("cold", "cached"):
            env = child_env(threads) | {"NUMBA_CACHE_DIR": cache}
            code = f"REPO = {str(REPO)!r}\n" + COMPILE_CHILD
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
            if done.returncode:
                sys.exit(f"compile child failed:\n{done.stderr[-3000:]}")
            times = json.loads(done.stdout.strip().splitlines()[-1])
            result[phase] = {k: round(v, 2) for k, v in times.items()} | {
                "total_s": round(sum(v for k, v in times.items() if k != "import_s"), 1)}
            print(f"numba compile, {phase}: {result[phase]}", flush=True)
    return result


def warm_cache(threads: int) -> None:
    """Compile into the repository's own cache (qlora_kit/gguf/__pycache__) so the timed exports do not."""
    subprocess.run([sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + COMPILE_CHILD], check=True, capture_output=True,
                   env=child_env(threads), timeout=3600)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity


def fixture_text(out: Path, rows: int = 40) -> Path:
    """The first medical rows as plain text (question, reasoning, answer): llama-perplexity's input."""
    lines = (FIXTURES / "medical_o1_en.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    texts = [f"{r['Question']}\n{r['Complex_CoT']}\n{r['Response']}\n" for r in map(json.loads, lines)]
    out.write_text("\n".join(texts), encoding="utf-8")
    return out


def perplexity(tool: Path, model: Path, text: Path, threads: int, chunks: int) -> dict:
    done = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks),
                           "-t", str(threads)], capture_output=True, text=True, timeout=7200)
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode or not found:
        sys.exit(f"llama-perplexity failed on {model}:\n{(done.stdout + done.stderr)[-3000:]}")
    return {"ppl": float(found.group(1)), "ppl_error": float(found.group(2))}


def old_quantizers(rev: str, work: Path) -> Path:
    """kquants.py of git revision `rev` (the numpy port), written to a temporary file."""
    path = work / f"kquants_{rev}.py"
    done = subprocess.run(["git", "show", f"{rev}:qlora_kit/gguf/kquants.py"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    path.write_text(done.stdout, encoding="utf-8")
    return path


def measure_perplexity(tools: dict, work: Path, big: Path, threads: int, old: Path | None, chunks: int) -> dict:
    from qlora_kit.gguf.export import export_gguf

    text = fixture_text(work / "medical.txt")
    models = {"random 1.5B-shape": big}
    try:
        sys.path.insert(0, str(REPO / "tools"))
        from measure_gguf import smollm2_folder

        from qlora_kit.model.smollm2 import find

        if find() is not None:
            models["SmolLM2-135M-Instruct"] = smollm2_folder()
    except SystemExit:
        pass
    result = {"text": "first 40 rows of shared/fixtures/medical_o1_en.jsonl (question, CoT, response)",
              "chunks": chunks, "context": 512, "models": {}}
    for name, folder in models.items():
        rows = {}
        files = {"ours": work / f"{name}-ours.gguf"}
        ours(folder, files["ours"], "q4_k_m", threads)
        if old:
            files["old numpy port"] = work / f"{name}-old.gguf"
            ours(folder, files["old numpy port"], "q4_k_m", threads, old)
        if name.startswith("random"):
            f16 = work / "big-f16.gguf"
            files["llama-quantize"] = work / "big-llama-q4_k_m.gguf"
            llama_quantize(tools["quantize"], f16, files["llama-quantize"], "q4_k_m", threads)
            files["f16"] = f16
        else:
            files["f16"] = export_gguf(folder, work / f"{name}-f16.gguf", "f16", modelfile=False,
                                       log=lambda *_: None).gguf_path
        for variant, path in files.items():
            rows[variant] = perplexity(tools["perplexity"], path, text, threads, chunks)
            print(f"perplexity {name} {variant}: {rows[variant]}", flush=True)
        if "old numpy port" in rows:
            rows["ours_vs_old_percent"] = round(100 * (rows["ours"]["ppl"] / rows["old numpy port"]["ppl"] - 1), 4)
        for path in files.values():
            if path.name != "big-f16.gguf":
                path.unlink(missing_ok=True)
        result["models"][name] = rows
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-quantize", type=Path, default=os.environ.get("LLAMA_QUANTIZE") or None)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--perplexity", action="store_true", help="llama-perplexity of the q4_k_m files")
    parser.add_argument("--ppl-chunks", type=int, default=8)
    parser.add_argument("--old-rev", help="git revision whose numpy quantizers --perplexity compares with")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.llama_quantize or not Path(args.llama_quantize).is_file():
        print("skipped: no llama-quantize (pass --llama-quantize PATH or set LLAMA_QUANTIZE)")
        return 0
    tools = {"quantize": Path(args.llama_quantize).resolve(),
             "perplexity": Path(args.llama_quantize).resolve().parent / "llama-perplexity"}
    if args.perplexity and not tools["perplexity"].is_file():
        sys.exit(f"--perplexity needs llama-perplexity beside {tools['quantize'].name}")
    import numba

    from qlora_kit.gguf.export import export_gguf

    types = args.types.split(",")
    result = {"command": "python tools/measure_kquant_speed.py " + " ".join(
                  a if not a.startswith("/") else Path(a).name for a in sys.argv[1:]),
              "model": "random f16 weights at R1-Distill-Qwen-1.5B's row shapes, 4 layers (tools/measure_kquant_speed"
                       ".py make_model)",
              "threads": args.threads, "machine_cores": os.cpu_count(), "numba": numba.__version__,
              "repeats": args.repeats, "load_at_start": load(), "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_model(work / "merged")
        f16 = export_gguf(folder, work / "big-f16.gguf", "f16", modelfile=False, log=lambda *_: None).gguf_path
        result["parameters"] = sum(int(t.n_elements) for t in __import__("gguf").GGUFReader(f16).tensors)
        result["compile"] = compile_times(args.threads)
        warm_cache(args.threads)
        for ft in types:
            runs = {"ours": [], "llama-quantize": []}
            for repeat in range(args.repeats):
                order = ("ours", "llama-quantize") if repeat % 2 == 0 else ("llama-quantize", "ours")
                for who in order:
                    out = work / f"{who}-{ft}.gguf"
                    run = (ours(folder, out, ft, args.threads) if who == "ours"
                           else llama_quantize(tools["quantize"], f16, out, ft, args.threads))
                    runs[who].append(run)
                    print(f"{ft} {who} #{repeat + 1}: {run}", flush=True)
            ours_s = statistics.median(r["export_s"] for r in runs["ours"])
            theirs_s = statistics.median(r["process_s"] for r in runs["llama-quantize"])
            row = {"ours_export_s_median": ours_s,
                   "ours_process_s_median": statistics.median(r["process_s"] for r in runs["ours"]),
                   "llama_quantize_s_median": theirs_s,
                   "llama_quantize_quantize_s_median": statistics.median(
                       r["quantize_s"] or 0 for r in runs["llama-quantize"]),
                   "ratio": round(ours_s / theirs_s, 3), "runs": runs,
                   "same_bytes": same_tensors(work / f"ours-{ft}.gguf", work / f"llama-quantize-{ft}.gguf")}
            print(f"{ft}: ours {ours_s:.1f} s, llama-quantize {theirs_s:.1f} s, ratio {row['ratio']:.2f}; "
                  f"tensors identical {row['same_bytes']['identical']}/{row['same_bytes']['tensors']}", flush=True)
            result["types"][ft] = row
            for who in runs:
                (work / f"{who}-{ft}.gguf").unlink(missing_ok=True)
        if args.perplexity:
            old = old_quantizers(args.old_rev, work) if args.old_rev else None
            result["perplexity"] = measure_perplexity(tools, work, folder, args.threads, old, args.ppl_chunks)
    result["load_at_end"] = load()
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def table(result: dict) -> str:
    lines = [f"threads {result['threads']} of {result['machine_cores']} cores; load {result['load_at_start']} at start",
             "| type | ours (s) | llama-quantize (s) | ratio | tensors byte-identical |",
             "| --- | --- | --- | --- | --- |"]
    for ft, row in result["types"].items():
        same = row["same_bytes"]
        lines.append(f"| {ft} | {row['ours_export_s_median']:.1f} | {row['llama_quantize_s_median']:.1f} | "
                     f"{row['ratio']:.2f} | {same['identical']}/{same['tensors']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
