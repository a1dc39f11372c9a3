"""Regenerate the embedded demo assets in `qlora_kit/demo/` (deterministic: re-running changes no byte).

    python tools/make_demo_assets.py [--out qlora_kit/demo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not

from qlora_kit.demo.build import write_demo  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "qlora_kit" / "demo",
                        help="output folder (default: qlora_kit/demo in this repository)")
    args = parser.parse_args(argv)
    write_demo(args.out)
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>9,}  {path}")


if __name__ == "__main__":
    main()
