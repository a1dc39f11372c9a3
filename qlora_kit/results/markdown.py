"""Markdown for files a person reads (samples.md, report.md): model output shown verbatim, whatever it holds."""

from __future__ import annotations

import re

CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
"""An undertrained model does produce these; written as \\xNN escapes they keep the files text."""


def escape_control(text: str) -> str:
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def fenced(text: str, language: str = "text") -> str:
    """A code block that shows `text` verbatim: model output can hold anything, even backticks. Control
    characters (which an undertrained model does produce) are written as \\xNN escapes, so the file stays text."""
    text = escape_control(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines())


def one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table_cell(text: str, width: int = 400) -> str:
    """One Markdown table cell: a single line, pipes and control characters escaped, long text shortened."""
    return escape_control(one_line(text, width)).replace("|", "\\|")
