"""Preference pairs from reasoning rows, for trying DPO / KTO / ORPO on real text without pairs of your own:

    python tools/pairs_from_rows.py ROWS.jsonl PAIRS.jsonl [--limit N]

Each row (Question / Complex_CoT / Response, as medical-o1-reasoning-SFT ships) becomes a pair: the chosen side is
the row's own reasoning and answer, the rejected side the same answer cut to its first sentence with no reasoning
(the "answered directly" reply the SFT template trains away). What DPO then learns is to reason before answering and
to answer in full: a shape, not new knowledge. docs/preference.md says how SmolLM2-135M did on them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def first_sentence(text: str) -> str:
    match = re.search(r"^(.+?[.!?。！？])(\s|$)", text.strip(), flags=re.S)
    return (match.group(1) if match else text.strip()).strip()


def pair(row: dict) -> dict | None:
    question, cot, answer = (str(row.get(k) or "").strip() for k in ("Question", "Complex_CoT", "Response"))
    short = first_sentence(answer)
    if not (question and cot and answer) or short == answer:
        return None  # a one-sentence answer has no shorter wrong-shaped version to reject
    return {"prompt": question, "chosen": f"<think>\n{cot}\n</think>\n\n{answer}", "rejected": short}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="at most this many pairs (0: all)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists: not overwritten", file=sys.stderr)
        return 2
    pairs = []
    for line in args.rows.read_text(encoding="utf-8").splitlines():
        made = pair(json.loads(line)) if line.strip() else None
        if made:
            pairs.append(made)
        if args.limit and len(pairs) == args.limit:
            break
    args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"{len(pairs)} pairs written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
