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
