"""The benchmark's way in: `python tools/bench.py --help`. The code is the package qlora_kit.bench (its docstring
has the GPU protocol and what a trial is); this file keeps the command and the names tools/calibrate_plan.py uses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.bench.cli import main, parse_args  # noqa: E402, F401
from qlora_kit.bench.document import host_info, library_versions  # noqa: E402, F401
from qlora_kit.bench.setups import model_config, parse_setup, planner_estimate  # noqa: E402, F401
from qlora_kit.bench.trial import (  # noqa: E402, F401
    _STATE_CACHE,
    bench_tokenizer,
    build_bench_trainer,
    build_model,
    make_step_timer,
    optimizer_state_bytes,
    tensor_peak,
)

if __name__ == "__main__":
    sys.exit(main())
