"""`python tools/merge.py RUN_DIR [--out DIR] [--dtype float16|bfloat16|float32] [--into original|dequantized]`

The same as `python -m qlora_kit.merge` (its docstring and `--help` describe everything), runnable from a
checkout without installing the package.

    python tools/merge.py runs/medical                  # base model and settings read from the run's saved recipe
    python tools/merge.py runs/medical --out merged/ --dtype bfloat16
    python tools/merge.py runs/medical --into dequantized
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.merge import main  # noqa: E402 - needs the checkout on sys.path first

if __name__ == "__main__":
    sys.exit(main())
