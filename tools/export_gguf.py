"""`python tools/export_gguf.py MERGED_DIR [--type q8_0|q6_k|q5_k_m|q4_k_m|q5_0|q4_0|f16|bf16] [--out FILE]
[--overwrite] [--no-modelfile] [--verify]`  ·  `python tools/export_gguf.py RUN_DIR --adapter [--base BASE.gguf]`

Exports a merged model folder (what tools/merge.py writes, or any 16-bit Qwen2/Llama folder such as
SmolLM2-135M-Instruct) to one GGUF file for llama.cpp / Ollama / LM Studio, in llama.cpp's quantization mixtures
(K-quants in numpy, no llama.cpp build), with an Ollama `Modelfile` beside it in the model's own chat format
(R1, ChatML or Llama 3); or, with --adapter, the run's LoRA adapter alone in llama.cpp's adapter format.
The package qlora_kit/gguf/ (its docstrings and `--help`) describes everything. Needs the `gguf` package:
`pip install 'qlora_kit[export]'` or `pip install gguf`.

    python tools/export_gguf.py runs/medical/merged   # the advised type (q8_0 for the 1.5B): merged-q8_0.gguf
    python tools/export_gguf.py runs/medical/merged --type q4_K_M   # runs/medical/merged-q4_k_m.gguf + Modelfile
    python tools/export_gguf.py runs/medical/merged --type q8_0 --out medical-q8_0.gguf --verify
    python tools/export_gguf.py runs/medical --adapter --base base-q4_k_m.gguf   # runs/medical/adapter.gguf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.gguf.export import main  # noqa: E402 - needs the checkout on sys.path first

if __name__ == "__main__":
    sys.exit(main())
