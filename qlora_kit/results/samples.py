"""Base vs fine-tuned answers at the end of a run: `samples.md` in the run directory and a side-by-side view.

The base answers come from the very model that was just trained, with the LoRA adapter switched off
(`model.disable_adapter()`): no second copy of the base is loaded, so this costs no memory, and the two
replies differ only by the adapter (same prompt, same seed).

Questions are the held-out eval rows (the model never trained on them), or the first training rows when
the recipe holds none out; samples.md says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from qlora_kit.chat.cpu_inference import dequantized_weights
from qlora_kit.chat.generate import GenerationSettings, Reply, ask, prompt_format
from qlora_kit.data.rows import Row
from qlora_kit.recipe.run_files import SAMPLES_FILE, SUMMARY_FILE
from qlora_kit.recipe.schema import DataSection, Recipe
from qlora_kit.results.markdown import fenced, one_line, quoted
from qlora_kit.train.artifacts import write_json

THINK_PREVIEW_CHARS = 240
"""The terminal view shows this much of each reasoning (samples.md has all of it)."""


@dataclass(frozen=True)
class SampleSettings:
    data: DataSection = field(default_factory=DataSection)
    """The run's data section: prompts are rendered exactly as in training."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    rows_from: str = "held-out eval rows"
    """Where the questions come from, as samples.md states it."""


@dataclass
class Sample:
    row: Row
    base: Reply
    tuned: Reply


def write_run_samples(model, tokenizer, recipe: Recipe, rows: list[Row], rows_from: str, out_dir: Path,
                      console: Console) -> list[Sample]:
    """The end-of-run step: the run's held-out rows (qlora_kit.data.examples.build_examples picks them), answered
    base vs fine-tuned, into samples.md. Returns the samples (none when the recipe asks for none)."""
    asked = recipe.samples
    if asked.count <= 0 or not rows:
        return []
    generation = GenerationSettings(max_new_tokens=asked.max_new_tokens, greedy=asked.greedy, seed=recipe.train.seed)
    return write_samples(model, tokenizer, rows[:asked.count], SampleSettings(recipe.data, generation, rows_from),
                         out_dir, console)


def write_samples(model, tokenizer, rows: list[Row], settings: SampleSettings, out_dir: Path,
                  console: Console) -> list[Sample]:
    """Answer each row's question with the adapter off and on; write samples.md and show them side by side.

    The model is put in eval mode for generation and back in its previous mode afterwards; the adapter
    is enabled again whatever happens. Ctrl-C or running out of memory stops the sampling, not the run:
    the samples done so far are written (and returned).
    """
    fmt = prompt_format(tokenizer, settings.data)
    path = Path(out_dir) / SAMPLES_FILE
    samples: list[Sample] = []
    console.rule(f"[bold]samples[/] base vs fine-tuned, {len(rows)} {settings.rows_from}")
    console.print(f"[dim]{settings.generation.describe()}")
    was_training = model.training
    model.eval()
    try:
        with dequantized_weights(model):  # on a CPU: each 4-bit weight dequantized once, not once per new token
            for row in rows:
                with model.disable_adapter():
                    base = ask(model, tokenizer, row.question, fmt, settings.generation)
                tuned = ask(model, tokenizer, row.question, fmt, settings.generation)
                samples.append(Sample(row, base, tuned))
                show_sample(console, len(samples), samples[-1])
    except (KeyboardInterrupt, torch.OutOfMemoryError) as stop:
        reason = "interrupted" if isinstance(stop, KeyboardInterrupt) else "out of memory"
        console.print(f"[yellow]samples stopped ({reason}) after {len(samples)} of {len(rows)} questions; "
                      "the adapter is saved either way.")
    finally:
        model.train(was_training)
    path.write_text(samples_markdown(samples, settings), encoding="utf-8")
    if samples:
        console.print(f"[bold]{format_line(samples)}[/]")
    console.print(f"[dim]all of it, reasoning included: {path}")
    return samples


# ------------------------------------------------------------------------------------------------ format compliance


FORMAT_RULE = "reasoning opened and closed (<think> … </think>), a non-empty answer, EOS within the token limit"


def format_counts(samples: list[Sample]) -> dict[str, int]:
    """Replies in the trained format, per side, and how many questions were asked."""
    return {"base": sum(s.base.in_format for s in samples), "fine_tuned": sum(s.tuned.in_format for s in samples),
            "of": len(samples)}


def format_line(samples: list[Sample]) -> str:
    """"format: base 0/8, fine-tuned 7/8" and what counts."""
    counts = format_counts(samples)
    return (f"format: base {counts['base']}/{counts['of']}, fine-tuned {counts['fine_tuned']}/{counts['of']} "
            f"({FORMAT_RULE})")


# ------------------------------------------------------------------------------------------------ samples.md


def samples_markdown(samples: list[Sample], settings: SampleSettings) -> str:
    lines = [
        "# Samples: base vs fine-tuned",
        "",
        "The same 4-bit model answers each question twice: with the LoRA adapter disabled (**base**) and enabled "
        "(**fine-tuned**), from the same prompt, rendered as in training, with the same seed.",
        "",
        f"- questions: {settings.rows_from}",
        f"- decoding: {settings.generation.describe()}",
        f"- {format_line(samples)}" if samples else "- no samples",
        "- the trained format is `<think>` reasoning `</think>` answer EOS for every model, whatever its chat "
        "template: the prompt is the template's own, and a model whose template does not open a think block "
        "decides by itself whether it opens one",
        "",
    ]
    for number, sample in enumerate(samples, start=1):
        lines += sample_markdown(number, sample, settings.generation.max_new_tokens)
    return "\n".join(lines).rstrip() + "\n"


def sample_markdown(number: int, sample: Sample, max_new_tokens: int) -> list[str]:
    row = sample.row
    lines = [f"## {number}. {one_line(row.question, 80)}", "", f"**Question** (row {row.number})", "",
             quoted(row.question), "", "**Reference answer**", "", quoted(row.response), ""]
    if row.cot:
        lines += details("Reference reasoning", row.cot)
    for title, reply in (("Base (adapter disabled)", sample.base), ("Fine-tuned (adapter enabled)", sample.tuned)):
        lines += [f"### {title}", "", f"_{reply_length(reply)}; {'in' if reply.in_format else 'not in'} the trained "
                  "format_", ""]
        if reply.opened:
            lines += details("Reasoning", reply.think or "(empty)")
        else:  # "answered directly" only when it also stopped: a reply cut at the limit answered nothing yet
            lines += ["_(no reasoning block: the model answered directly)_" if reply.finished else
                      "_(no reasoning block; the reply was cut at the token limit)_", ""]
        lines += ["**Answer**", "", fenced(reply.answer) if reply.answer else missing_answer(reply, max_new_tokens),
                  ""]
    return lines


def reply_length(reply: Reply) -> str:
    return f"reply of {reply.new_tokens} tokens" + (", ended with EOS" if reply.finished else ", cut at the limit")


def missing_answer(reply: Reply, max_new_tokens: int) -> str:
    if reply.closed:
        return "_(no answer: the model stopped right after its reasoning)_"
    if reply.finished:
        return "_(no answer: the model stopped without closing its reasoning)_"
    return f"_(no answer: the reasoning did not finish within {max_new_tokens} new tokens)_"


def details(summary: str, text: str) -> list[str]:
    # Blank lines around the body: Markdown renderers only format block content inside HTML when it stands alone.
    return [f"<details><summary>{summary}</summary>", "", fenced(text), "", "</details>", ""]


# ------------------------------------------------------------------------------------------------ terminal


def show_sample(console: Console, number: int, sample: Sample) -> None:
    """The two replies in two columns: reasoning (shortened, dim) above each answer."""
    table = Table(title=f"{number}. {one_line(sample.row.question, 100)}", title_justify="left", expand=True,
                  show_lines=False, caption=f"reference: {one_line(sample.row.response, 200)}",
                  caption_justify="left")
    table.add_column("base (adapter disabled)", ratio=1)
    table.add_column("fine-tuned", ratio=1)
    table.add_row(reply_view(sample.base), reply_view(sample.tuned))
    console.print(table)


def reply_view(reply: Reply) -> Group:
    direct = "(answered directly)" if reply.finished else "(no reasoning block)"
    think = one_line(reply.think, THINK_PREVIEW_CHARS) or ("(no reasoning)" if reply.opened else direct)
    answer = Text(reply.answer, style="bold") if reply.answer else Text("(no answer)", style="yellow")
    parts = [Text(think, style="dim"), answer]
    if not reply.finished:
        parts.append(Text(f"(cut at the limit: {reply.new_tokens} new tokens, no EOS)", style="yellow"))
    return Group(*parts)


def sample_finished_run(outcome, tokenizer, recipe: Recipe, examples, out_dir: Path, console) -> list[Sample]:
    """Base vs fine-tuned answers from the model still in memory (the adapter switched off, then on), and their
    format counts added to summary.json.

    The adapter and summary are saved by now: whatever goes wrong here is reported in one line and the run
    still ends as finished, with its report. `outcome`: qlora_kit.train.fit.Outcome of a finished run."""
    if outcome.sharded:  # sharded weights: generating would need every rank; merge and chat instead
        console.print("[dim]samples skipped under FSDP: merge the adapter, then `python -m qlora_kit.chat`.")
        return []
    try:
        samples = write_run_samples(outcome.model, tokenizer, recipe, examples.sample_rows, examples.samples_from,
                                    out_dir, console)
    except Exception as error:  # noqa: BLE001 - a failed extra must not turn a finished run into a traceback
        console.print(f"[yellow]samples skipped ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                      "the adapter is saved. Try the model with `python -m qlora_kit.chat` instead.")
        return []
    if samples:  # summary.json written again: the adapter and summary were saved first, whatever sampling does
        counts = format_counts(samples)
        outcome.summary.update(format_base=f"{counts['base']}/{counts['of']}",
                               format_fine_tuned=f"{counts['fine_tuned']}/{counts['of']}")
        write_json(out_dir / SUMMARY_FILE, outcome.summary)
    return samples
