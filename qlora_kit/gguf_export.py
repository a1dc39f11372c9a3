"""Old import path of the GGUF export (`python -m qlora_kit.gguf_export`, the `export` subcommand): the code is
the qlora_kit.gguf package now (qlora_kit/gguf/export.py)."""

import sys

from qlora_kit.gguf.export import export_gguf, main  # noqa: F401 - re-exported

if __name__ == "__main__":
    sys.exit(main())
