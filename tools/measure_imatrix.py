"""Measure what `--imatrix` buys: llama.cpp's perplexity on a run's HELD-OUT rows for f16 and each quantized type,
ours and llama-quantize's, each without and with the same importance matrix (computed by our export from the run's
TRAINING rows, `--imatrix auto`), and how long the matrix took.

    python tools/measure_imatrix.py --llama-cpp DIR [--models smollm2,big] [--types q4_k_m,q3_k_m]
        [--rows FILE.jsonl] [--steps 12] [--eval-rows 48] [--imatrix-tokens N] [--ppl-chunks N]
        [--json bench/results/gguf_imatrix.json]
    python tools/measure_imatrix.py --time-only [--models smollm2,big] [--big-layers 28] [--imatrix-tokens N]
        only the importance matrix: its tokens, seconds and tokens/s (no llama.cpp needed; SmolLM2 as is, its
        folder with a recipe naming --rows beside it, when --steps is 0).
    python tools/measure_imatrix.py --sweep 2048,8192,32768 --llama-cpp DIR [--models smollm2] [--types ...]
        how many calibration tokens the matrix needs: per token count, the matrix (auto), each type quantized
        with it by llama-quantize (and by us, where the quantizers take one), llama-perplexity on the held-out rows.

DIR holds llama.cpp's llama-quantize and llama-perplexity (its build's bin/; default: the folder of
$LLAMA_QUANTIZE, as tests/test_gguf_mixture.py reads it); without them the tool stops, saying so.

The models:
  * smollm2: SmolLM2-135M-Instruct (`python -m qlora_kit.smollm2` fetches it) fine-tuned by the commands a user
    types (`python -m qlora_kit.run recipes/smol_medical.toml` on --rows, --steps steps, --eval-rows held out),
    then merged (`python -m qlora_kit.merge`): a merged folder with its run behind it, so `--imatrix auto` reads
    the run's training rows and the held-out rows are the run's own.
  * big: random weights at R1-Distill-Qwen-1.5B's row shapes (hidden 1536, intermediate 8960, vocabulary 151936,
    4 layers: 654 M parameters, the shape tools/measure_gguf.py's speed comparison uses), the R1-Distill tokenizer,
    and a recipe beside the weights naming --rows, so that `auto` and the held-out split work as for a run. Its
    perplexity is near the vocabulary size (random weights): only the differences between variants mean anything.
Per model: our f16 export (also llama-quantize's input); per type, our export without and with the imatrix and
llama-quantize's without and with the same .imatrix file; each file's llama-perplexity (-c 512, its default: the
score is over the second half of each chunk) on the held-out rows rendered as training renders them and written
as text (llama-perplexity reads special-token spellings as text, the same for every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = REPO.parent / "shared" / "fixtures"
DEFAULT_ROWS = FIXTURES / "medical_o1_en.jsonl"
BIG = dict(hidden=1536, intermediate=8960, layers=4, heads=12, kv=2, vocab=151936)  # R1-Distill-Qwen-1.5B's rows


def run(command: list[str], timeout: int = 7200, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


# ---------------------------------------------------------------------------------------------------------------
# The merged folders, each with its run's recipe beside the weights


def smollm2_merged(root: Path, rows: Path, steps: int, eval_rows: int) -> Path:
    from qlora_kit.model.smollm2 import find

    if find() is None:
        sys.exit("SmolLM2 GGUF not found: run `python -m qlora_kit.smollm2` first")
    started = time.monotonic()
    run([sys.executable, "-m", "qlora_kit.run", str(REPO / "recipes" / "smol_medical.toml"), f"data.source={rows}",
         f"data.eval_rows={eval_rows}", f"train.max_steps={steps}", "train.eval_steps=0", "train.save_steps=0",
         "samples.count=0", f"output.dir={root / 'run'}"])
    run([sys.executable, "-m", "qlora_kit.merge", str(root / "run"), "--out", str(root / "merged")])
    print(f"smollm2: fine-tuned {steps} steps and merged in {time.monotonic() - started:.0f} s", flush=True)
    return root / "merged"


def with_recipe(folder: Path, rows: Path, eval_rows: int, max_length: int) -> None:
    """A recipe beside the weights as the merge leaves one, naming `rows`: `auto` and the held-out split read it."""
    from qlora_kit.recipe.loading import recipe_to_toml
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE, Recipe

    recipe = Recipe()
    recipe.model.name = str(folder)
    recipe.data.source, recipe.data.eval_rows, recipe.data.max_length = str(rows), eval_rows, max_length
    (folder / TRAINING_RECIPE_FILE).write_text(recipe_to_toml(recipe), encoding="utf-8")


def smollm2_as_is(root: Path, rows: Path, eval_rows: int) -> Path:
    """SmolLM2's 16-bit folder, copied, with a recipe naming `rows` (no training: for --time-only --steps 0)."""
    sys.path.insert(0, str(REPO / "tools"))
    from measure_gguf import smollm2_folder

    folder = root / "merged"
    shutil.copytree(smollm2_folder(), folder)
    with_recipe(folder, rows, eval_rows, 768)
    return folder


def big_merged(root: Path, rows: Path, eval_rows: int, layers: int = 4) -> Path:
    """Random bf16 weights at the 1.5B's row shapes, the R1 tokenizer, and a recipe as the merge leaves one."""
    sys.path.insert(0, str(REPO / "tools"))
    from measure_gguf import random_qwen2

    folder = random_qwen2(root / "merged", BIG | {"layers": layers}, "bfloat16")
    with_recipe(folder, rows, eval_rows, 2048)
    return folder


def held_out_text(folder: Path, out: Path) -> dict:
    """The run's held-out rows (the split its training made), rendered and encoded as training did, as text."""
    import io

    from rich.console import Console

    from qlora_kit.data.examples import build_examples
    from qlora_kit.gguf.imatrix import load_tokenizer, run_recipe

    recipe = run_recipe(folder)
    tokenizer = load_tokenizer(folder)
    examples = build_examples(recipe, tokenizer, Console(file=io.StringIO()))
    texts = [tokenizer.decode(e.input_ids, skip_special_tokens=False) for e in examples.eval]
    out.write_text("".join(texts), encoding="utf-8")
    return {"rows": len(examples.eval), "tokens_as_trained": sum(len(e.input_ids) for e in examples.eval),
            "train_rows": len(examples.train)}


# ---------------------------------------------------------------------------------------------------------------
# The files and their perplexity


def perplexity(tool: Path, gguf_path: Path, text: Path, chunks: int, threads: int) -> dict:
    started = time.monotonic()
    done = run([str(tool), "-m", str(gguf_path), "-f", str(text), "-c", "512", "--chunks", str(chunks),
                "-t", str(threads)])
    output = done.stdout + done.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
    if not found:
        sys.exit(f"no perplexity in llama-perplexity's output for {gguf_path}:\n{output[-2000:]}")
    return {"ppl": float(found.group(1)), "ppl_error": float(found.group(2)),
            "seconds": round(time.monotonic() - started, 1), "bytes": gguf_path.stat().st_size}


def measure_model(name: str, folder: Path, work: Path, tools: dict, types: list[str], tokens: int, chunks: int,
                  threads: int) -> dict:
    from qlora_kit.gguf.export import export_gguf
    from qlora_kit.gguf.imatrix import imatrix_for_export, save_imatrix
    from qlora_kit.plan.gguf_mixture import FILE_TYPES

    quiet = {"modelfile": False, "log": lambda *_: None}
    text = work / "held-out.txt"
    result = {"held_out": held_out_text(folder, text), "ppl_chunks": chunks, "threads": threads, "types": {}}
    f16 = export_gguf(folder, work / "f16.gguf", "f16", **quiet).gguf_path
    result["f16"] = perplexity(tools["llama-perplexity"], f16, text, chunks, threads)
    print(f"{name} f16: {result['f16']}", flush=True)

    imatrix = imatrix_for_export(folder, "auto", tokens, log=print)
    imatrix_file = save_imatrix(imatrix, work / f"{name}.imatrix")
    imatrix.path = str(imatrix_file)
    result["imatrix"] = {"tokens": imatrix.tokens, "chunks": imatrix.chunk_count, "seconds": round(imatrix.seconds, 1),
                         "tokens_per_s": round(imatrix.tokens / imatrix.seconds, 1), "entries": len(imatrix),
                         "dataset": imatrix.dataset, "device": "cpu", "threads": threads}
    print(f"{name} imatrix: {result['imatrix']}", flush=True)
    for quant in types:
        row = {}
        if quant not in FILE_TYPES:
            result["types"][quant] = {"skipped": "not an export type in this checkout (plan/gguf_mixture.py)"}
            continue
        variants = {"ours": None, "ours+imatrix": imatrix}
        for label, used in variants.items():
            started = time.monotonic()
            try:
                path = export_gguf(folder, work / f"{quant}-{label}.gguf", quant, imatrix=used, **quiet).gguf_path
            except (KeyError, NotImplementedError, ValueError) as error:  # a block format not written here yet
                row[label] = {"skipped": f"{type(error).__name__}: {error}"}
                continue
            row[label] = perplexity(tools["llama-perplexity"], path, text, chunks, threads)
            row[label]["quantize_s"] = round(time.monotonic() - started, 1)
            path.unlink()
        for label, extra in (("llama.cpp", []), ("llama.cpp+imatrix", ["--imatrix", str(imatrix_file)])):
            path = work / f"{quant}-{label}.gguf"
            started = time.monotonic()
            run([str(tools["llama-quantize"]), *extra, str(f16), str(path), quant, str(threads)])
            row[label] = perplexity(tools["llama-perplexity"], path, text, chunks, threads)
            row[label]["quantize_s"] = round(time.monotonic() - started, 1)
            path.unlink()
        for mine, theirs in (("ours", "llama.cpp"), ("ours+imatrix", "llama.cpp+imatrix")):
            if "ppl" in row.get(mine, {}):
                row[f"{mine} vs {theirs} %"] = round(100 * (row[mine]["ppl"] / row[theirs]["ppl"] - 1), 2)
        for side in ("ours", "llama.cpp"):
            if "ppl" in row.get(f"{side}+imatrix", {}) and "ppl" in row.get(side, {}):
                row[f"imatrix effect on {side} %"] = round(100 * (row[f"{side}+imatrix"]["ppl"] / row[side]["ppl"] - 1),
                                                         2)
        result["types"][quant] = row
        print(f"{name} {quant}: {json.dumps(row)}", flush=True)
    return result


def table(results: dict) -> str:
    lines = ["| model | type | ours | ours + imatrix | llama.cpp | llama.cpp + imatrix | ours+im vs llama.cpp+im |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def ppl(cell: dict) -> str:
        return f"{cell['ppl']:.4f}" if "ppl" in cell else "n/a"

    for name, model in results.items():
        lines.append(f"| {name} | f16 | {ppl(model['f16'])} | | | | |")
        for quant, row in model["types"].items():
            if "skipped" in row:
                lines.append(f"| {name} | {quant} | n/a ({row['skipped']}) | | | | |")
                continue
            versus = row.get("ours+imatrix vs llama.cpp+imatrix %")
            lines.append(f"| {name} | {quant} | {ppl(row['ours'])} | {ppl(row['ours+imatrix'])} | "
                         f"{ppl(row['llama.cpp'])} | {ppl(row['llama.cpp+imatrix'])} | "
                         f"{'n/a' if versus is None else f'{versus:+.2f} %'} |")
    return "\n".join(lines)


def model_folder(name: str, work: Path, args) -> Path:
    """smollm2 fine-tuned and merged (--steps > 0) or as is with a recipe beside it; big: the random 1.5B shape."""
    if name == "smollm2":
        return (smollm2_merged(work, args.rows, args.steps, args.eval_rows) if args.steps
                else smollm2_as_is(work, args.rows, args.eval_rows))
    if name == "big":
        return big_merged(work, args.rows, args.eval_rows, args.big_layers)
    sys.exit(f"unknown model {name!r}: smollm2 or big")


def sweep(folder: Path, work: Path, tools: dict, types: list[str], counts: list[int], chunks: int,
          threads: int) -> dict:
    from qlora_kit.gguf.export import export_gguf
    from qlora_kit.gguf.imatrix import imatrix_for_export, save_imatrix

    quiet = {"modelfile": False, "log": lambda *_: None}
    text = work / "held-out.txt"
    result = {"held_out": held_out_text(folder, text), "ppl_chunks": chunks, "threads": threads, "tokens": {}}
    f16 = export_gguf(folder, work / "f16.gguf", "f16", **quiet).gguf_path
    result["f16"] = perplexity(tools["llama-perplexity"], f16, text, chunks, threads)
    for quant in types:  # the baseline without a matrix
        path = work / f"{quant}.gguf"
        run([str(tools["llama-quantize"]), str(f16), str(path), quant, str(threads)])
        result.setdefault("without", {})[quant] = perplexity(tools["llama-perplexity"], path, text, chunks, threads)
    for count in counts:
        imatrix = imatrix_for_export(folder, "auto", count, log=print)
        file = save_imatrix(imatrix, work / f"{count}.imatrix")
        row = {"imatrix_seconds": round(imatrix.seconds, 1)}
        for quant in types:
            path = work / f"{quant}.gguf"
            run([str(tools["llama-quantize"]), "--imatrix", str(file), str(f16), str(path), quant, str(threads)])
            row[f"{quant} llama.cpp"] = perplexity(tools["llama-perplexity"], path, text, chunks, threads)["ppl"]
            export_gguf(folder, path, quant, overwrite=True, imatrix=imatrix, **quiet)
            row[f"{quant} ours"] = perplexity(tools["llama-perplexity"], path, text, chunks, threads)["ppl"]
        result["tokens"][str(count)] = row
        print(f"{count} tokens: {row}", flush=True)
    return result


def sweep_table(results: dict) -> str:
    lines = []
    for name, model in results.items():
        columns = sorted({key for row in model["tokens"].values() for key in row if key != "imatrix_seconds"})
        lines += [f"{name} (f16 {model['f16']['ppl']:.4f})", "| imatrix tokens | seconds | " + " | ".join(columns)
                  + " |", "| --- | --- |" + " --- |" * len(columns),
                  "| none | | " + " | ".join(f"{model['without'][c.split()[0]]['ppl']:.4f}"
                                            if c.endswith("llama.cpp") else "" for c in columns) + " |"]
        for count, row in model["tokens"].items():
            lines.append(f"| {count} | {row['imatrix_seconds']} | "
                         + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def time_only(args) -> int:
    """The importance matrix alone, through each model, from the rows' training split."""
    from qlora_kit.gguf.imatrix import DEFAULT_TOKENS, imatrix_for_export

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            folder = model_folder(name, work, args)
            imatrix = imatrix_for_export(folder, "auto", args.imatrix_tokens or DEFAULT_TOKENS, log=print)
            results[name] = {"tokens": imatrix.tokens, "seconds": round(imatrix.seconds, 1),
                             "tokens_per_s": round(imatrix.tokens / imatrix.seconds, 1), "entries": len(imatrix),
                             "layers": args.big_layers if name == "big" else 30, "threads": os.cpu_count()}
            print(f"{name}: {results[name]}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        report = {"command": "python tools/measure_imatrix.py " + " ".join(sys.argv[1:]), "imatrix_time": results,
                  "machine": f"{os.cpu_count()} CPU cores, shared with other work"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path,
                        default=Path(os.environ["LLAMA_QUANTIZE"]).parent if os.environ.get("LLAMA_QUANTIZE") else None,
                        help="folder with llama-quantize and llama-perplexity (default: $LLAMA_QUANTIZE's folder)")
    parser.add_argument("--models", default="smollm2,big")
    parser.add_argument("--types", default="q4_k_m,q3_k_m")
    parser.add_argument("--rows", type=Path, default=DEFAULT_ROWS, help="the training rows (medical-o1 format)")
    parser.add_argument("--steps", type=int, default=12, help="smollm2's fine-tuning steps")
    parser.add_argument("--eval-rows", type=int, default=48, help="rows held out of training: the perplexity text")
    parser.add_argument("--imatrix-tokens", type=int, default=None, help="default: the export's own default")
    parser.add_argument("--ppl-chunks", type=int, default=16, help="llama-perplexity --chunks (512 tokens each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--big-layers", type=int, default=4, help="layers of the random 1.5B-shaped model")
    parser.add_argument("--time-only", action="store_true", help="only time the importance matrix")
    parser.add_argument("--sweep", help="comma-separated imatrix token counts to compare (see above)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.time_only:
        return time_only(args)
    tools = {name: (args.llama_cpp / name) if args.llama_cpp else None for name in ("llama-quantize",
                                                                                    "llama-perplexity")}
    missing = [name for name, path in tools.items() if path is None or not path.is_file()]
    if missing:
        sys.exit(f"llama.cpp's {', '.join(missing)} not found: pass --llama-cpp DIR (its build's bin/) or set "
                 "LLAMA_QUANTIZE")
    if not args.rows.is_file():
        sys.exit(f"training rows not found: {args.rows} (pass --rows)")
    from qlora_kit.gguf.imatrix import DEFAULT_TOKENS

    tokens = args.imatrix_tokens or DEFAULT_TOKENS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            folder = model_folder(name, work, args)
            if args.sweep:
                results[name] = sweep(folder, work, tools, args.types.split(","),
                                      [int(n) for n in args.sweep.split(",")], args.ppl_chunks, args.threads)
            else:
                results[name] = measure_model(name, folder, work, tools, args.types.split(","), tokens,
                                              args.ppl_chunks, args.threads)
            shutil.rmtree(work, ignore_errors=True)
    shown = sweep_table(results) if args.sweep else table(results)
    print(shown)
    if args.json:
        import platform

        import torch

        shown_argv = [("DIR" if before == "--llama-cpp" else arg)  # the command, not this machine's folders
                      for before, arg in zip(["", *sys.argv[1:-1]], sys.argv[1:], strict=True)]
        report = {"command": "python tools/measure_imatrix.py " + " ".join(shown_argv), "models": results,
                  "table_markdown": shown, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, shared",
                  "torch": torch.__version__}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
