"""`python -m qlora_kit COMMAND ...` is `qlora-kit COMMAND ...`; `python -m qlora_kit RECIPE.toml` still trains."""

import sys

from qlora_kit.cli import COMMANDS, main

if len(sys.argv) > 1 and sys.argv[1] not in COMMANDS and sys.argv[1].endswith(".toml"):
    sys.argv.insert(1, "run")
sys.exit(main())
