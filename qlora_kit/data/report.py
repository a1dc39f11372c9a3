"""The data report: what was read, left out and kept, and an example with its trained tokens highlighted.

Shown before any weight loads (and by --dry-run), kept for report.md and read by the studio.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from qlora_kit.data.encode import Example, LengthReport
from qlora_kit.data.rows import RowSet, row_list


def data_lines(rowset: RowSet, layout: str, n_train: int, n_eval: int, lengths: LengthReport,
               n_kept: int, notes: list[str] = ()) -> list[str]:
    """The data report as plain lines: shown before training and kept for report.md. `notes` go just
    before the closing "training on N rows"."""
    kind = "" if rowset.layout == "columns" else f"{rowset.layout} "
    lines = [f"source: {rowset.source}  ({rowset.total} {kind}rows, {len(rowset.rows)} usable)"]
    lines += [f"left out {len(numbers)} row(s) with {reason}: rows {row_list(numbers)}"
              for reason, numbers in rowset.dropped.items()]
    lines += [f"format: {layout}", f"split: {n_train} train rows, {n_eval} eval rows", *lengths.lines(), *notes,
              f"training on {n_kept} rows"]
    return lines


def data_notes(rowset: RowSet, data) -> list[str]:
    """What the rows will not teach, though nothing was left out: missing reasoning, an unused reasoning column."""
    notes = []
    custom = data.format not in ("chat", "plain")
    if data.cot_column and custom and "{cot}" not in data.format:
        notes.append(f"data.format has no {{cot}}: the reasoning column `{data.cot_column}` is not trained on")
    elif data.cot_column or rowset.layout != "columns":
        empty = [row.number for row in rowset.rows if not row.cot.strip()]
        where = f"an empty `{data.cot_column}`" if rowset.layout == "columns" else \
            "no <think>...</think> in the answer"
        if empty:
            notes.append(f"{len(empty)} row(s) with {where}: trained with an empty reasoning part (rows "
                         f"{row_list(empty)})")
    return notes


WARNING_WORDS = ("longer", "fills max_length", "empty", "no {cot}")
"""Data report lines with these are shown in yellow: rows dropped, cut or trained on less than they hold."""


def show_data(console: Console, lines: list[str]) -> None:
    console.rule("[bold]data")
    for line in lines:
        warn = line.startswith("left out") or any(w in line for w in WARNING_WORDS)
        console.print(Text(line, style="yellow" if warn else "bold" if line.startswith("training on") else ""))


def highlighted(example: Example, tokenizer) -> Text:
    """The example's text, prompt dim, trained tokens bold green (exactly where the loss starts)."""
    # Decoded span by span (runs of equal mask), not token by token: byte-level BPE splits one Chinese
    # character over several tokens, and decoding those alone shows U+FFFD instead of the character.
    text, start = Text(), 0
    mask = example.completion_mask
    for end in range(1, len(mask) + 1):
        if end == len(mask) or mask[end] != mask[start]:
            text.append(tokenizer.decode(example.input_ids[start:end]), style="bold green" if mask[start] else "dim")
            start = end
    return text


def show_example(console: Console, example: Example, tokenizer) -> None:
    trained = sum(example.completion_mask)
    console.rule(f"[bold]first example[/] (row {example.row}: {len(example.input_ids)} tokens, {trained} trained)")
    console.print(Text("dim = prompt (no loss), ", style="dim") + Text("green = trained", style="bold green"))
    console.print(highlighted(example, tokenizer))
