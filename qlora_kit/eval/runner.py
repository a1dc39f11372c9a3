"""Score every task on both sides, question block by question block, with a progress bar; Ctrl-C keeps what
was scored.

Each block of questions is scored by the base, then by the fine-tuned model, so an interrupted evaluation still
compares the two on the same questions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from qlora_kit.eval.harness import DocScore, Task, score

BLOCK = 16
"""Questions per lm_eval call: the progress bar's step and what Ctrl-C can lose."""


@dataclass
class Side:
    """A model to score: its lm_eval wrapper and the context it is scored in (the adapter switched off, ...)."""

    name: str
    """`base` or `fine_tuned`."""
    label: str
    lm: object
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class TaskResult:
    task: Task
    asked: int
    """Questions asked for (the task's size, or --limit)."""
    scores: dict[str, list[DocScore]] = field(default_factory=dict)
    """Side name -> per-question scores, in question order (the same questions on every side)."""


@dataclass
class Outcome:
    results: list[TaskResult]
    interrupted: bool


def run_tasks(tasks: list[Task], sides: list[Side], limit: int, console, block: int = BLOCK) -> Outcome:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = [TaskResult(task, min(task.size, limit) if limit else task.size) for task in tasks]
    for result in results:
        result.scores = {side.name: [] for side in sides}
    total = sum(r.asked for r in results) * len(sides)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    interrupted = False
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("scoring", total=total)
        try:
            for result in results:
                for start in range(0, result.asked, block):
                    indices = list(range(start, min(start + block, result.asked)))
                    done = {}
                    for side in sides:
                        progress.update(bar, description=f"{result.task.name} · {side.label}")
                        with side.context():
                            done[side.name] = score(side.lm, result.task, indices)
                        progress.advance(bar, len(indices))
                    for name, scores in done.items():  # a block counts once every side has scored it
                        result.scores[name] += scores
        except KeyboardInterrupt:
            interrupted = True
    return Outcome(results, interrupted)
