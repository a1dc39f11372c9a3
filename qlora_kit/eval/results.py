"""What an evaluation leaves: eval.json (every number, per question for a local file), a section in report.md,
and the table in the terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qlora_kit.eval.runner import Outcome, TaskResult
from qlora_kit.eval.stats import Accuracy

EVAL_FILE, REPORT_FILE = "eval.json", "report.md"
SECTION_START, SECTION_END = "<!-- qlora_kit.eval -->", "<!-- /qlora_kit.eval -->"
SIDE_TITLES = {"base": "base", "fine_tuned": "fine-tuned"}


def accuracy(result: TaskResult, side: str) -> Accuracy:
    scores = result.scores[side]
    return Accuracy(sum(s.correct for s in scores), len(scores))


def scored(result: TaskResult) -> int:
    return min((len(s) for s in result.scores.values()), default=0)


def eval_record(outcome: Outcome, model: str, scoring: str, sides: dict[str, str], command: str,
                versions: dict[str, str]) -> dict:
    tasks = []
    for result in outcome.results:
        entry = {"task": result.task.name, "source": result.task.source, "questions": scored(result),
                 "asked": result.asked, "of": result.task.size}
        for side in result.scores:
            entry[side] = accuracy(result, side).as_dict()
            unparsable = sum(s.unparsable for s in result.scores[side])
            if result.task.name.endswith("_generate"):
                entry[side]["unparsable"] = unparsable
        if result.task.questions:  # a local file: each question, what each side chose
            entry["per_question"] = per_question(result)
        tasks.append(entry)
    return {"model": model, "sides": sides, "scoring": scoring, "interrupted": outcome.interrupted,
            "tasks": tasks, "command": command, "versions": versions}


def per_question(result: TaskResult) -> list[dict]:
    rows = []
    sides = list(result.scores)
    for position in range(scored(result)):
        question = result.task.questions[position]
        row = {"line": question.number, "answer": question.letters[question.answer]}
        for side in sides:
            s = result.scores[side][position]
            row[side] = question.letters[s.choice] if s.choice is not None else ("?" if s.unparsable else "")
            row[f"{side}_correct"] = s.correct
        rows.append(row)
    return rows


def write_eval_json(folder: Path, record: dict) -> Path:
    path = Path(folder) / EVAL_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ report.md


def table_rows(record: dict) -> list[list[str]]:
    """task | questions | base | fine-tuned | change, one row per task."""
    rows = []
    for task in record["tasks"]:
        cells = [task["task"], f"{task['questions']}" + (f" of {task['of']}" if task["questions"] < task["of"]
                                                          else "")]
        values = {}
        for side in ("base", "fine_tuned"):
            if side in task:
                values[side] = task[side]
                cells.append(cell(task[side]))
            else:
                cells.append("—")
        if len(values) == 2:
            change = 100 * (values["fine_tuned"]["accuracy"] - values["base"]["accuracy"])
            cells.append(f"{change:+.1f} points")
        else:
            cells.append("")
        rows.append(cells)
    return rows


def cell(side: dict) -> str:
    low, high = side["ci95"]
    text = (f"{100 * side['accuracy']:.1f} % ({100 * low:.0f}–{100 * high:.0f}), "
            f"{side['correct']}/{side['n']}")
    if "unparsable" in side:
        text += f", {side['unparsable']} without a letter"
    return text


def report_section(record: dict) -> str:
    lines = [SECTION_START, "## Benchmark accuracy: base vs fine-tuned", "",
             f"Scored by lm-evaluation-harness: {record['scoring']}. In brackets: the 95 % confidence interval "
             "(Wilson). Sides: " + "; ".join(f"**{SIDE_TITLES.get(k, k)}** = {v}" for k, v in record["sides"].items())
             + ".", ""]
    if record["interrupted"]:
        lines += ["_Interrupted: the questions scored before Ctrl-C._", ""]
    lines += ["| task | questions | base | fine-tuned | change |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(record)]
    sources = [f"- `{t['task']}`: {t['source']}" for t in record["tasks"]]
    lines += ["", *sources, "", f"Command: `{record['command']}`; every number: `{EVAL_FILE}`.", SECTION_END]
    return "\n".join(lines) + "\n"


def add_to_report(folder: Path, record: dict) -> Path:
    """report.md gets the section (replaced, when an earlier evaluation wrote one); created if absent."""
    path = Path(folder) / REPORT_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    section = report_section(record)
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ terminal


def show(console, record: dict) -> None:
    from rich.table import Table

    table = Table(title="accuracy, base vs fine-tuned (95 % CI)", title_justify="left")
    for column in ("task", "questions", "base", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in table_rows(record):
        table.add_row(*row)
    console.print(table)
    if record["interrupted"]:
        console.print("[yellow]interrupted: these are the questions scored before Ctrl-C.")
