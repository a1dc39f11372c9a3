"""Benchmark accuracy before and after fine-tuning, on EleutherAI's lm-evaluation-harness (the `[eval]` extra).

    questions.py  your own multiple-choice .jsonl: read, column map, every row checked
    harness.py    the bridge to lm_eval: hub tasks by name, a local file as a task built on the fly, HFLM
    runner.py     both sides scored block by block, progress bar, Ctrl-C keeps what was scored
    stats.py      accuracy and its 95 % (Wilson) interval
    results.py    eval.json, the report.md section, the terminal table
    cli.py        `python -m qlora_kit.eval RUN_DIR_OR_MERGED ...`
    after_run.py  the end of a training run, when its recipe has an [eval] section
"""

from qlora_kit.eval.cli import main  # `qlora-kit eval` calls the package's main

__all__ = ["main"]
