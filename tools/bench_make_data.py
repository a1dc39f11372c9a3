"""`python tools/bench_make_data.py DOCS --base-url URL --model NAME --tokenizer T`: make-data's generation rate at
concurrency 1 and 4 against the same server, one fresh job each, in one run (bench/results/make_data_rate.json).

What it answers: does a job keep a local server busy, or wait on itself between requests? Each job is the command a
user types (`python -m qlora_kit.make_data ...`), timed from its start to its exit, and read back from its own
summary.json: requests, rows kept, tokens received. Start the server yourself (the figures are the server's as much
as ours: say which), e.g. `transformers serve MODEL --port 8000` or `python tests/teacher_server.py 8799 slow` (a
fixed second per reply: what is left is make-data's own overlap).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_job(docs: list[str], args, concurrency: int, folder: Path) -> dict:
    out = folder / f"c{concurrency}" / "rows.jsonl"
    command = [sys.executable, "-m", "qlora_kit.make_data", *docs, "--out", str(out), "--base-url", args.base_url,
               "--model", args.model, "--tokenizer", args.tokenizer, "--concurrency", str(concurrency),
               "--max-chunks", str(args.max_chunks), "--answer-tokens", str(args.answer_tokens), "--eval-share", "0"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    summary = json.loads((out.parent / "rows.job" / "summary.json").read_text())
    answered = summary["rows_train"] + sum(v for k, v in summary["refused"].items() if not k.startswith("question"))
    return {"concurrency": concurrency, "exit_code": result.returncode, "wall_s": round(seconds, 1),
            "generation_s": summary["seconds"], "requests": summary["requests"],
            "requests_per_min": round(60 * summary["requests"] / summary["seconds"], 2),
            "questions_answered": answered, "rows_kept": summary["rows_train"],
            "rows_per_min": round(60 * summary["rows_train"] / summary["seconds"], 2),
            "completion_tokens_per_s": round(summary["completion_tokens"] / summary["seconds"], 1),
            "refused": summary["refused"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("docs", nargs="+")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--server", required=True, help="what the server is, for the record (e.g. 'transformers serve, "
                                                    "SmolLM2-135M, CPU')")
    p.add_argument("--max-chunks", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "make_data_rate.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-make-data-") as folder:
        runs = [one_job(args.docs, args, c, Path(folder)) for c in (1, 4)]
    record = {"command": "python tools/bench_make_data.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "server": args.server, "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
              f"{__import__('os').cpu_count()} cores", "runs": runs,
              "speed_up_4_over_1": round(runs[1]["requests_per_min"] / max(runs[0]["requests_per_min"], 1e-9), 2)}
    existing = json.loads(args.out.read_text()) if args.out.is_file() else []
    existing = [r for r in existing if r.get("server") != args.server] + [record]
    args.out.write_text(json.dumps(existing, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
