"""The terminal output's console: rich's own on a terminal, no wrapping at 80 columns anywhere else; and the
libraries' own progress bars and advice kept out of it."""

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


def quiet_libraries() -> None:
    """Our status view says what matters; the libraries' progress bars and advice would bury it."""
    import logging
    import warnings

    # bitsandbytes advertises an optional CPU *inference* kernel on import; training never uses it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Deprecation notices about the libraries' own internals are for their authors, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)\.")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
