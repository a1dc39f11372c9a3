"""`python -m qlora_kit.smollm2`: the documented command that fetches SmolLM2-135M-Instruct's GGUF; the code is
qlora_kit.model.smollm2."""

import sys

from qlora_kit.model.smollm2 import main

if __name__ == "__main__":
    sys.exit(main())
