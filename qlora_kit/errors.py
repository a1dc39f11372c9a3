"""The one error type a user ever sees: what is wrong, where, and how to fix it.

Everything the user can fix (a recipe key, a data row, a model path) is raised as `UserError`;
the command-line entry points print it in a short panel and exit with code 2. A traceback is
reserved for our own bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """A problem in the user's input, reported as one screen of text."""

    def __init__(self, title: str, problems: Iterable[str] = (), hint: str = "",
                 exit_code: int = EXIT_USER_ERROR) -> None:
        self.title = title
        self.exit_code = exit_code
        self.problems = list(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines += ["", self.hint]
        return "\n".join(lines)


def print_user_error(error: UserError) -> None:
    """Print the error to stderr as a red panel (plain text when stderr is not a terminal)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        print(f"error: {error.render()}", file=sys.stderr)
        return
    console.print(Panel(Text(error.render()), title="[bold red]qlora_kit: cannot continue", expand=False))


def did_you_mean(word: str, candidates, prefix: str = "") -> str:
    """" (did you mean `x`?)" for the closest candidate to a misspelt name, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{prefix}{close[0]}`?)" if close else ""
