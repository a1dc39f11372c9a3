"""The terminal output's console: rich's own on a terminal, no wrapping at 80 columns anywhere else."""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 120
"""Width of tables and rules when the output is a log file or a pipe (rich would assume 80)."""


def make_console(**options) -> Console:
    """Off a terminal (a log, CI, `| tee`) rich wraps every line at 80 columns, which splits a printed command over
    lines and makes it fail when pasted back: there, text is never wrapped and tables get
    $COLUMNS or LOG_WIDTH columns."""
    console = Console(**options)
    if console.is_terminal:
        return console
    return Console(width=None if "COLUMNS" in os.environ else LOG_WIDTH, soft_wrap=True, **options)
