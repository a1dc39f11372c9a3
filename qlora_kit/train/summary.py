"""What the run prints around training: the recipe at a glance before, the outcome and summary after. (The data
report and the highlighted example are qlora_kit.data.report; the live view during training is status.py.)"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def show_recipe(console: Console, changes: list[str], source: str, resolved_file) -> None:
    """The recipe at a glance: only what differs from the defaults (the full resolved one is saved in the run)."""
    console.rule(f"[bold]recipe[/] {source}")
    for line in changes:
        console.print(Text(f"  {line}"))
    # Written once the run directory is prepared (never over a finished run's): a run refused before that has none.
    console.print(f"[dim]  everything else: the defaults (docs/recipe.md); every setting as used is saved in "
                  f"{resolved_file} when the run starts")


def outcome_lines(summary: dict) -> list[str]:
    """Did it work, in a few lines: the eval loss from the 16-bit base to the trained model (all tokens, the
    answer's, the reasoning's), the NF4 base beside it, and the format compliance of the samples."""
    lines = []
    before, after = summary.get("eval_loss_before"), summary.get("final_eval_loss")
    if after is not None:
        rows = f" on {summary['eval_rows']} held-out rows" if summary.get("eval_rows") else ""
        start = "16-bit base " if before is not None else ""
        lines.append(f"eval loss {start}{change(before, after)} trained{rows}")
        parts = [f"{part} tokens {change(summary.get(f'eval_{part}_loss_before'), summary[f'final_eval_{part}_loss'])}"
                 for part in ("answer", "reasoning") if summary.get(f"final_eval_{part}_loss") is not None]
        if parts:
            lines.append("  " + ", ".join(parts))
        nf4 = summary.get("eval_loss_nf4_base")
        if nf4 is not None:
            cost = f": 4-bit storage cost {nf4 - before:+.4f}, which training wins back first" if before is not None \
                else ""
            lines.append(f"  NF4 base (the 4-bit model training starts from) {nf4:.4f}{cost}")
        if summary.get("eval_before_note"):
            lines.append(f"  {summary['eval_before_note']}")
    if summary.get("judged_rows"):  # GRPO: the held-out rows answered before and after, scored by the rewards
        n = summary["judged_rows"]

        def count(key: str) -> str:
            before, after = summary[f"judged_{key}_base"], summary[f"judged_{key}_fine_tuned"]
            return f"{round(before * n)}/{n} → {round(after * n)}/{n}"

        lines.append(f"reward {change(summary['judged_mean_reward_base'], summary['judged_mean_reward_fine_tuned'])}"
                     f" on {n} {summary.get('judged_from', 'rows')}")
        lines.append(f"  right answers {count('accuracy')}, in format {count('format')}")
    if summary.get("format_fine_tuned"):
        lines.append(f"format: base {summary['format_base']}, fine-tuned {summary['format_fine_tuned']} "
                     "(replies with the reasoning closed, an answer, and EOS)")
    return lines


def change(before: float | None, after: float) -> str:
    return f"{before:.4f} → {after:.4f}" if before is not None else f"{after:.4f}"


def show_summary(console: Console, summary: dict, output_dir) -> None:
    for line in outcome_lines(summary):
        console.print(Text(line, style="bold"))
    table = Table(title="run summary", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in summary.items():
        if value is not None:
            table.add_row(key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"[bold green]done.[/] adapter, report.md, loss curve and metrics in {output_dir}")
