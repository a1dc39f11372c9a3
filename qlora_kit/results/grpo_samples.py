"""A GRPO run judged: the held-out rows answered before (adapter off) and after (adapter on) training, each completion
scored by the run's own reward functions; `samples.md` shows every completion with its rewards, summary.json and
report.md the totals.

    mean reward   the weighted sum of the rewards, as training computed it (qlora_kit.train.rewards)
    accuracy      right answers: the letter for multiple-choice rows (also shown alone), the number or text for
                  short-answer rows, whatever weights the recipe gives those rewards
    format        completions in the trained format (one think block, closed, an answer, EOS)

Same model in memory, same prompts, same seed for both sides: the two differ only by the adapter (as samples.md of an
SFT run). Decoding: samples.greedy, up to grpo.max_completion_length new tokens (what training allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from qlora_kit.chat.cpu_inference import dequantized_weights
from qlora_kit.chat.generate import GenerationSettings, generate_ids
from qlora_kit.data.checkable import Prompted
from qlora_kit.data.replies import markers_for, stop_ids
from qlora_kit.recipe.run_files import SAMPLES_FILE, SUMMARY_FILE
from qlora_kit.recipe.schema import Recipe
from qlora_kit.results.markdown import fenced, one_line, quoted
from qlora_kit.train.artifacts import write_json
from qlora_kit.train.rewards import BUILT_IN, WeightedReward, build_rewards

SIDES = ("base", "fine_tuned")


@dataclass
class Scored:
    text: str
    new_tokens: int
    finished: bool
    rewards: dict[str, float | None]
    """The recipe's reward functions, by name (None: the function does not apply to this row)."""
    total: float
    right: bool
    in_format: bool


@dataclass
class Judged:
    row: Prompted
    base: Scored
    tuned: Scored


@dataclass
class Judgement:
    rows: list[Judged] = field(default_factory=list)
    rows_from: str = ""
    decoding: str = ""

    def side(self, name: str) -> dict:
        """mean_reward, accuracy (all rows), choice_accuracy (multiple-choice rows), format (share in format)."""
        scored = [j.base if name == "base" else j.tuned for j in self.rows]
        choice = [s for j, s in zip(self.rows, scored, strict=True) if j.row.row.kind == "choice"]
        n = max(len(scored), 1)
        out = {"mean_reward": round(sum(s.total for s in scored) / n, 4),
               "accuracy": round(sum(s.right for s in scored) / n, 4),
               "format": round(sum(s.in_format for s in scored) / n, 4)}
        if choice:
            out["choice_accuracy"] = round(sum(s.right for s in choice) / len(choice), 4)
        return out

    def summary(self) -> dict:
        """Flat keys for summary.json: judged_rows, and per side mean reward, accuracy, format."""
        out = {"judged_rows": len(self.rows), "judged_from": self.rows_from}
        for name in SIDES:  # "judged_" keeps them apart from an SFT run's format_base / format_fine_tuned
            out.update({f"judged_{key}_{name}": value for key, value in self.side(name).items()})
        return out

    def lines(self) -> list[str]:
        """"mean reward 0.12 → 0.85, accuracy 1/8 → 6/8, format 0/8 → 8/8 on 8 held-out rows"."""
        if not self.rows:
            return []
        base, tuned, n = self.side("base"), self.side("fine_tuned"), len(self.rows)
        lines = [f"mean reward {base['mean_reward']:.3f} → {tuned['mean_reward']:.3f}, accuracy "
                 f"{round(base['accuracy'] * n)}/{n} → {round(tuned['accuracy'] * n)}/{n}, format "
                 f"{round(base['format'] * n)}/{n} → {round(tuned['format'] * n)}/{n} ({self.rows_from})"]
        if "choice_accuracy" in base:
            lines.append(f"multiple-choice accuracy {base['choice_accuracy']:.0%} → {tuned['choice_accuracy']:.0%}")
        return lines


def judge(model, tokenizer, recipe: Recipe, rows: list[Prompted], rows_from: str, console: Console) -> Judgement:
    """Every row answered with the adapter off, then on, and scored. Ctrl-C or running out of memory stops the
    judging, not the run: what was judged so far is kept."""
    eos, markers = stop_ids(model, tokenizer), markers_for(tokenizer, recipe.data)
    rewards = build_rewards(recipe, tokenizer, eos)
    # Right and in format, whatever weights the recipe gives: each row's own check and the format rule.
    checks = {kind: BUILT_IN[kind](markers, eos) for kind in ("choice", "exact", "numeric", "format")}
    settings = GenerationSettings(max_new_tokens=recipe.grpo.max_completion_length, greedy=recipe.samples.greedy,
                                  seed=recipe.train.seed)
    judgement = Judgement(rows_from=rows_from, decoding=settings.describe())
    console.rule(f"[bold]judged[/] base vs GRPO-trained, {len(rows)} {rows_from}")
    console.print(f"[dim]{settings.describe()}")
    was_training = model.training
    model.eval()
    try:
        with dequantized_weights(model):
            for row in rows:
                with model.disable_adapter():
                    base = answer(model, tokenizer, row, settings, rewards, checks, eos)
                tuned = answer(model, tokenizer, row, settings, rewards, checks, eos)
                judgement.rows.append(Judged(row, base, tuned))
    except (KeyboardInterrupt, torch.OutOfMemoryError) as stop:
        reason = "interrupted" if isinstance(stop, KeyboardInterrupt) else "out of memory"
        console.print(f"[yellow]judging stopped ({reason}) after {len(judgement.rows)} of {len(rows)} rows.")
    finally:
        model.train(was_training)
    for line in judgement.lines():
        console.print(f"[bold]{line}")
    return judgement


def answer(model, tokenizer, row: Prompted, settings: GenerationSettings, rewards: list[WeightedReward],
           checks: dict, eos: set[int]) -> Scored:
    ids = generate_ids(model, tokenizer, row.prompt_ids, settings)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    fields = {key: [value] for key, value in row.row.fields().items()}

    def call(function):
        return function(prompts=[row.prompt], completions=[text], completion_ids=[ids], **fields)[0]

    scores = {r.name: call(r.function) for r in rewards}
    total = sum(r.weight * scores[r.name] for r in rewards if scores[r.name] is not None)
    return Scored(text, len(ids), bool(ids) and ids[-1] in eos, scores, round(total, 4),
                  bool(call(checks[row.row.kind])), bool(call(checks["format"])))


# ------------------------------------------------------------------------------------------------ samples.md


def samples_markdown(judgement: Judgement) -> str:
    lines = ["# Samples: base vs GRPO-trained", "",
             "The same 4-bit model answers each question twice: with the LoRA adapter disabled (**base**) and enabled "
             "(**GRPO-trained**), from the same prompt, with the same seed; each completion is scored by the run's "
             "reward functions.", "",
             f"- questions: {judgement.rows_from}", f"- decoding: {judgement.decoding}"]
    lines += [f"- {line}" for line in judgement.lines()] or ["- nothing judged"]
    lines.append("")
    for number, judged in enumerate(judgement.rows, start=1):
        row = judged.row.row
        lines += [f"## {number}. {one_line(row.question, 80)}", "", f"**Question** (row {row.number}, checked by "
                  f"`{row.kind}`)", "", quoted(row.question), "", f"**Reference answer**: `{row.answer}`", ""]
        for title, scored in (("Base (adapter disabled)", judged.base), ("GRPO-trained (adapter enabled)",
                                                                          judged.tuned)):
            rewards = ", ".join(f"{name} {'—' if value is None else f'{value:g}'}"
                                for name, value in scored.rewards.items())
            ending = "ended with EOS" if scored.finished else "cut at the limit"
            verdict = f"{'right' if scored.right else 'wrong'}; {'in' if scored.in_format else 'not in'} the format"
            lines += [f"### {title}", "", f"_reward {scored.total:g} ({rewards}); {verdict}; {scored.new_tokens} "
                      f"tokens, {ending}_", "", fenced(scored.text), ""]
    return "\n".join(lines).rstrip() + "\n"


def judge_finished_run(outcome, tokenizer, recipe: Recipe, examples, out_dir: Path, console) -> Judgement:
    """The end-of-run step of a GRPO run: judge, write samples.md, add the totals to summary.json. The adapter and
    summary are saved by now: whatever goes wrong here is reported in one line and the run still ends as finished.
    `examples`: qlora_kit.data.checkable.GrpoExamples."""
    if not examples.judged or recipe.samples.count <= 0 and not examples.held_out:
        return Judgement()
    try:
        judgement = judge(outcome.model, tokenizer, recipe, examples.judged, examples.judged_from, console)
    except Exception as error:  # noqa: BLE001 - a failed extra must not turn a finished run into a traceback
        console.print(f"[yellow]judging skipped ({type(error).__name__}: {str(error).splitlines()[0][:200]}); the "
                      "adapter is saved.")
        return Judgement()
    (Path(out_dir) / SAMPLES_FILE).write_text(samples_markdown(judgement), encoding="utf-8")
    if judgement.rows:
        outcome.summary.update(judgement.summary())
        write_json(Path(out_dir) / SUMMARY_FILE, outcome.summary)
    return judgement
