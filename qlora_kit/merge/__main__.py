"""`python -m qlora_kit.merge RUN_DIR ...`: the package docstring and `--help` describe everything."""

import sys

from qlora_kit.merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
