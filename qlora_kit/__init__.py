"""qlora_kit: QLoRA fine-tuning of reasoning LLMs on 8 GB GPUs, driven by one TOML recipe."""

import os

__version__ = "0.1.0"

# OpenMP's default makes torch's idle CPU threads spin for a while after every parallel region. On a CPU that other
# programs share (a laptop's browser, a busy CI runner) the spinning threads take the cores from the ones doing the
# work: on 2 shared cores every small op then costs milliseconds, and a training step of SmolLM2-135M took 52-73 s
# instead of 31-34 s (docs/benchmarks.md: "Where the CPU time goes, and what changed"). Sleeping threads wake in
# microseconds. Read once, when torch loads OpenMP: set here, before our modules import torch; an explicit
# OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Importing transformers' Trainer imports bitsandbytes, which on a CPU with AVX512-BF16 asks the `kernels` package for
# an optional fused CPU *inference* kernel from the Hub and, refused (publisher trust, offline mode), logs two lines no
# user can act on: "Failed to load CPU gemm_4bit_forward from kernels-community ...". Nothing changes when it is
# refused: bitsandbytes falls back to its own CPU kernel, and our CPU paths compute in float32, which that bf16-only
# kernel does not take. Set before any of our modules imports bitsandbytes (quiet_libraries comes too late for that).
import logging  # noqa: E402

for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
