"""`python -m qlora_kit.make_data SOURCE... --out rows.jsonl --base-url URL --model NAME` (see `--help`)."""

import sys

from qlora_kit.make_data.cli import main

if __name__ == "__main__":
    sys.exit(main())
