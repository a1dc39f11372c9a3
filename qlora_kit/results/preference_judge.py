"""What a finished preference run shows: on the held-out rows (never trained on), how the model ranks the chosen
and the rejected side before and after tuning, measured by its own log-probabilities, with the model still in
memory (the reference: the adapter off, or the SFT adapter the run started from).

- prefers chosen: the share of pairs where the model gives the chosen side the higher log-probability per token
  (EOS included; per token, since a summed log-probability prefers whichever side is shorter), before (the
  reference) and after (the tuned model);
- against the reference (DPO's implicit reward, TRL's `rewards/accuracies` on unseen pairs): the share where the
  chosen side's log-ratio to the reference beats the rejected side's, and the mean margin beta x (that difference);
- KTO's rated answers: the share whose log-ratio to the reference has the label's sign (good up, bad down).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from qlora_kit.data.pairs import PairExample, RatedExample


@dataclass
class PreferenceJudgement:
    rows: int
    rows_from: str
    figures: dict
    """What summary.json gets (pref_* keys)."""

    def lines(self) -> list[str]:
        f = self.figures
        out = [f"judged on {self.rows} {self.rows_from}"]
        if "pref_accuracy_before" in f:
            out.append(f"prefers chosen (log-probability per token): {percent(f['pref_accuracy_before'])} before -> "
                       f"{percent(f['pref_accuracy_after'])} after; mean margin chosen - rejected "
                       f"{f['pref_logp_margin_before']:+.3f} -> {f['pref_logp_margin_after']:+.3f} per token")
        if "pref_reward_accuracy" in f:
            out.append(f"against the reference: chosen rewarded higher on {percent(f['pref_reward_accuracy'])} of "
                       f"the pairs, mean margin {f['pref_reward_margin']:+.3f} (beta x log-ratio)")
        if "pref_label_accuracy" in f:
            out.append(f"rated answers moved the label's way (good up, bad down, against the reference): "
                       f"{percent(f['pref_label_accuracy'])}; mean reward good {f['pref_reward_good']:+.3f}, bad "
                       f"{f['pref_reward_bad']:+.3f}")
        return out


def percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def sequence_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt), summed over the completion's tokens."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    targets = ids[0, len(prompt_ids):]
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())


@contextlib.contextmanager
def reference_of(model):
    """The reference model the run was held to: the "ref" adapter TRL copies from an SFT run's adapter, else the
    base with the adapter off."""
    if "ref" in getattr(model, "peft_config", {}):
        model.set_adapter("ref")
        try:
            yield
        finally:
            model.set_adapter("default")
    else:
        with model.disable_adapter():
            yield


def judge(model, examples: list, beta: float, rows_from: str, method: str) -> PreferenceJudgement:
    """Score every row with the reference and the tuned model (one forward pass per side and model)."""
    model.eval()

    def scores(e) -> list[tuple[float, int]]:
        sides = [e.chosen_ids, e.rejected_ids] if isinstance(e, PairExample) else [e.completion_ids]
        return [(sequence_logp(model, e.prompt_ids, side), len(side)) for side in sides]

    with reference_of(model):
        before = [scores(e) for e in examples]
    after = [scores(e) for e in examples]
    figures: dict = {"pref_judged_rows": len(examples), "pref_judged_from": rows_from}
    pairs = [(b, a) for e, b, a in zip(examples, before, after, strict=True) if isinstance(e, PairExample)]
    if pairs:
        n = len(pairs)

        def per_token_margin(sides) -> float:
            (chosen, chosen_tokens), (rejected, rejected_tokens) = sides
            return chosen / chosen_tokens - rejected / rejected_tokens

        figures.update(
            pref_accuracy_before=round(sum(per_token_margin(b) > 0 for b, _ in pairs) / n, 4),
            pref_accuracy_after=round(sum(per_token_margin(a) > 0 for _, a in pairs) / n, 4),
            pref_logp_margin_before=round(sum(per_token_margin(b) for b, _ in pairs) / n, 4),
            pref_logp_margin_after=round(sum(per_token_margin(a) for _, a in pairs) / n, 4))
        if method != "orpo":  # ORPO has no reference to hold a reward against; DPO's reward sums over the tokens
            margins = [beta * ((a[0][0] - b[0][0]) - (a[1][0] - b[1][0])) for b, a in pairs]
            figures.update(pref_reward_accuracy=round(sum(m > 0 for m in margins) / n, 4),
                           pref_reward_margin=round(sum(margins) / n, 4))
    rated = [(e.label, beta * (a[0][0] - b[0][0])) for e, b, a in zip(examples, before, after, strict=True)
             if isinstance(e, RatedExample)]
    if rated:
        good = [r for label, r in rated if label]
        bad = [r for label, r in rated if not label]
        figures.update(pref_label_accuracy=round(sum((r > 0) == label for label, r in rated) / len(rated), 4),
                       pref_reward_good=round(sum(good) / len(good), 4) if good else 0.0,
                       pref_reward_bad=round(sum(bad) / len(bad), 4) if bad else 0.0)
    return PreferenceJudgement(len(examples), rows_from, figures)


def judge_finished_run(outcome, tokenizer, recipe, examples, out_dir, console) -> tuple[list, list[str]]:
    """The judgement (summary.json, report.md) and base vs tuned samples (samples.md) of a finished run. The adapter
    and summary are saved by now: whatever goes wrong here is reported in one line and the run still ends as
    finished. Returns (samples, the judgement's lines)."""
    from qlora_kit.recipe.run_files import SUMMARY_FILE
    from qlora_kit.results.samples import sample_finished_run
    from qlora_kit.train.artifacts import write_json

    held_out = examples.held_out
    rows = held_out or examples.train[:max(recipe.samples.count, 8)]
    rows_from = "held-out rows (not trained on)" if held_out else \
        "training rows (data.eval_rows = 0: these were trained on, so this says little)"
    lines = []
    try:
        judgement = judge(outcome.model, rows, recipe.pref.beta, rows_from, recipe.train.method)
    except Exception as error:  # noqa: BLE001 - a failed extra must not turn a finished run into a traceback
        console.print(f"[yellow]judging skipped ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                      "the adapter is saved.")
    else:
        lines = judgement.lines()
        console.rule("[bold]before -> after")
        for line in lines:
            console.print(line)
        outcome.summary.update(judgement.figures)
        write_json(out_dir / SUMMARY_FILE, outcome.summary)
    return sample_finished_run(outcome, tokenizer, recipe, examples, out_dir, console), lines
