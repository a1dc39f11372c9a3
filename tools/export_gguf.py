"""`python tools/export_gguf.py MERGED_DIR [--type f16|q8_0] [--out FILE] [--overwrite] [--no-modelfile] [--verify]`

Exports a merged model folder (what tools/merge.py writes, or any 16-bit Qwen2/Llama folder such as
SmolLM2-135M-Instruct) to one GGUF file for llama.cpp / Ollama, with an Ollama `Modelfile` beside it in the
model's own chat format (R1, ChatML or Llama 3). `qlora_kit/gguf/export.py` (its docstring and `--help`)
describes everything. Needs the `gguf` package: `pip install 'qlora_kit[export]'` or `pip install gguf`.

    python tools/export_gguf.py runs/medical/merged          # f16: runs/medical/merged-f16.gguf + Modelfile
    python tools/export_gguf.py runs/medical/merged --type q8_0 --out medical-q8_0.gguf --verify
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.gguf.export import main  # noqa: E402 - needs the checkout on sys.path first

if __name__ == "__main__":
    sys.exit(main())
