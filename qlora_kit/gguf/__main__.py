"""`python -m qlora_kit.gguf MERGED_DIR [--type q4_k_m] ...`: also `qlora-kit export`, `python tools/export_gguf.py`."""

import sys

from qlora_kit.gguf.export import main

sys.exit(main())
