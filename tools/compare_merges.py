"""Which merge is the right default? Measure it on a finished run:

    python tools/compare_merges.py runs/smol_medical [--questions 8] [--max-new-tokens 384] [--out FILE.json]

The adapter was trained on the NF4 base. Merging its update into the dequantized NF4 weights (tools/merge.py's
default for a 4-bit run, --into dequantized) keeps that model but bakes the 4-bit rounding in; merging it into the
original 16-bit weights (--into original) changes the model it was trained against. For three models

    trained       the run directory as it is: NF4 base + adapter (what samples.md and `chat RUN_DIR` show)
    original      tools/merge.py RUN_DIR --into original      (16-bit base + update)
    dequantized   tools/merge.py RUN_DIR --into dequantized   (NF4 round trip of the base + update)

this writes the eval loss on the run's held-out rows (all tokens, answer tokens), the greedy replies' agreement with
the trained model's (tokens equal before the first difference), and their format compliance (reasoning closed, an
answer, EOS within the limit), as JSON and as a Markdown table. All on one machine, in one process, models loaded one
at a time, merged folders in float32 so that the merge itself adds no rounding of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--questions", type=int, default=8, help="held-out questions answered greedily by each model")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", type=Path, help="JSON file to write (default: RUN_DIR/merge_comparison.json)")
    return parser.parse_args(argv)


def measure(loaded, examples, rows, settings) -> dict:
    """Eval losses and greedy replies of one loaded model (qlora_kit.chat.Loaded)."""
    from qlora_kit.chat.generate import ask
    from qlora_kit.train.eval_loss import evaluate_losses

    started = time.monotonic()
    losses = evaluate_losses(loaded.model, examples)
    replies = [ask(loaded.model, loaded.tokenizer, row.question, loaded.fmt, settings) for row in rows]
    return {"eval_loss": losses.loss, "eval_answer_loss": losses.answer_loss, "eval_rows": losses.rows,
            "in_format": sum(r.in_format for r in replies), "replies": [r.text for r in replies],
            "reply_ids": [loaded.tokenizer(r.text, add_special_tokens=False).input_ids for r in replies],
            "seconds": round(time.monotonic() - started, 1)}


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    from qlora_kit.merge.verify import greedy_agreement

    equal, total = greedy_agreement(reference, other)
    identical = sum(a == b for a, b in zip(reference, other, strict=True))
    return {"greedy_tokens_equal": equal, "greedy_tokens": total, "identical_replies": identical}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console

    from qlora_kit.chat.generate import GenerationSettings
    from qlora_kit.chat.loading import load_merged, load_run
    from qlora_kit.console import quiet_libraries
    from qlora_kit.data.examples import build_examples
    from qlora_kit.merge.cli import main as merge_main
    from qlora_kit.recipe.loading import load_recipe

    quiet_libraries()
    run_dir = args.run_dir.resolve()
    recipe = load_recipe(run_dir / "recipe.toml")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=True)
    results, started = {}, time.monotonic()

    trained = load_run(run_dir)
    recipe.samples.count = args.questions  # the questions: the first held-out rows, as the run's own samples
    picked = build_examples(recipe, trained.tokenizer, Console(file=io.StringIO()))
    examples, rows = picked.eval, picked.sample_rows
    print(f"{len(examples)} held-out rows for the eval loss, {len(rows)} questions answered greedily "
          f"(up to {args.max_new_tokens} new tokens)", flush=True)
    results["trained"] = measure(trained, examples, rows, settings)
    del trained
    with tempfile.TemporaryDirectory(prefix="qlora_kit-compare-") as folder:
        for mode in ("original", "dequantized"):
            out = Path(folder) / mode
            code = merge_main([str(run_dir), "--out", str(out), "--into", mode, "--dtype", args.dtype, "--no-verify"])
            if code != 0:
                raise SystemExit(f"merge --into {mode} failed ({code})")
            merged = load_merged(out)
            results[mode] = measure(merged, examples, rows, settings)
            results[mode].update(agreement(results["trained"]["reply_ids"], results[mode]["reply_ids"]))
            del merged
    report = {
        "run_dir": str(run_dir), "base": recipe.model.display_name, "questions": len(rows),
        "max_new_tokens": args.max_new_tokens, "merged_dtype": args.dtype,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(), "command": "python tools/compare_merges.py " + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.monotonic() - started, 1),
        # The token ids only served the agreement count above; the reply texts stay.
        "models": {mode: {k: v for k, v in figures.items() if k != "reply_ids"} for mode, figures in results.items()},
    }
    path = args.out or run_dir / "merge_comparison.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(report))
    print(f"written: {path}")
    return 0


def table(report: dict) -> str:
    models = report["models"]
    lines = ["| model | eval loss | answer-token loss | format (greedy) | greedy tokens equal to the trained model's |",
             "| --- | --- | --- | --- | --- |"]
    names = {"trained": "trained: NF4 base + adapter", "original": "merged into the original 16-bit weights",
             "dequantized": "merged into the dequantized NF4 weights"}
    for key, name in names.items():
        m = models[key]
        same = "—" if key == "trained" else (f"{m['greedy_tokens_equal']}/{m['greedy_tokens']} "
                                             f"({m['identical_replies']}/{report['questions']} replies identical)")
        lines.append(f"| {name} | {m['eval_loss']:.4f} | {m['eval_answer_loss']:.4f} | "
                     f"{m['in_format']}/{report['questions']} | {same} |")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "trl")}


if __name__ == "__main__":
    sys.exit(main())
