"""The GRPO rewards (grpo.rewards in the recipe): each a named function of a completion, 1.0 when it is right.

Every reward is called the way TRL's GRPOTrainer calls reward functions: lists over a batch of completions,
`reward(prompts=..., completions=..., completion_ids=..., answer=..., kind=..., letters=..., row=...)`, returning one
float per completion, or None where it does not apply (TRL then leaves it out of that reward's mean, and the weighted
sum of the others decides). The same functions judge the held-out rows before and after training
(qlora_kit.results.grpo_samples), so "reward" means one thing in the live view, metrics.jsonl and samples.md.

    format   1 if the completion is in the trained format: one think block, opened (by the prompt or the model)
             and closed, then a non-empty answer, then EOS before max_completion_length: the rule of the format
             count in samples.md too (qlora_kit.data.replies.in_format); a second <think> or </think> fails it.
    choice   multiple-choice rows: 1 if the letter the answer (after </think>) names is the right one, else 0.
             A completion whose reasoning never closed has no answer: 0.
    exact    short text answers: 1 if the answer equals the reference after normalisation (case, inner spaces,
             punctuation at the ends), else 0.
    numeric  numeric answers: 1 if the last number in the answer equals the reference (relative 1e-6), else 0.
    length   DAPO's soft over-long penalty (TRL's get_soft_overlong_punishment): 0 up to max_completion_length -
             length_cache tokens, then falling linearly to -1 at max_completion_length. Applies to every row.

A user's own reward is "path/to/file.py:function" in grpo.rewards: that file, and only that file, is imported
(loading it runs its code), and the function is called with the same arguments (add **kwargs to ignore the ones you
do not need; TRL also passes trainer_state, log_metric and log_extra).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.data.checkable import last_number, normalize_answer, numbers_equal, parse_number
from qlora_kit.data.choices import chosen_letter
from qlora_kit.data.replies import Markers, Split, answer_part, in_format, markers_for, read_reply
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import REWARD_NAMES, Recipe

# ------------------------------------------------------------------------------------------------ the rewards


class Reward:
    """One reward function: `score` judges one completion; calling it scores a batch, as TRL calls it."""

    __name__ = "reward"

    def __init__(self, markers: Markers, eos_ids: set[int]):
        self.markers, self.eos_ids = markers, eos_ids

    def __call__(self, prompts, completions, completion_ids, **fields) -> list[float | None]:
        out = []
        for i, (prompt, text, ids) in enumerate(zip(prompts, completions, completion_ids, strict=True)):
            row = {key: values[i] for key, values in fields.items() if isinstance(values, list)}
            out.append(self.score(read_reply(as_text(text), as_text(prompt), self.markers), ids, row))
        return out

    def score(self, reading: Split, ids: list[int], row: dict) -> float | None:
        raise NotImplementedError


def as_text(value) -> str:
    """TRL passes plain text for text prompts, and [{"role": ..., "content": ...}] for conversational ones."""
    if isinstance(value, list):
        return "".join(str(message.get("content", "")) for message in value if isinstance(message, dict))
    return str(value)


class FormatReward(Reward):
    __name__ = "format"

    def score(self, reading, ids, row):
        ended = bool(ids) and ids[-1] in self.eos_ids
        return float(in_format(reading, ended, has_reasoning=self.markers.separator is not None))


class ChoiceReward(Reward):
    __name__ = "choice"

    def score(self, reading, ids, row):
        if row.get("kind") != "choice":
            return None
        answer = answer_part(reading)
        letters = row.get("letters") or "ABCDEFGHIJ"
        return float(answer is not None and chosen_letter(answer, list(letters)) == row["answer"])


class ExactReward(Reward):
    __name__ = "exact"

    def score(self, reading, ids, row):
        if row.get("kind") != "exact":
            return None
        answer = answer_part(reading)
        return float(answer is not None and normalize_answer(answer) == normalize_answer(row["answer"]))


class NumericReward(Reward):
    __name__ = "numeric"

    def score(self, reading, ids, row):
        if row.get("kind") != "numeric":
            return None
        answer, reference = answer_part(reading), parse_number(row["answer"])
        got = last_number(answer) if answer is not None else None
        return float(got is not None and reference is not None and numbers_equal(got, reference))


class LengthReward(Reward):
    """TRL's soft over-long punishment (trl.rewards.get_soft_overlong_punishment), on the completion's token count."""

    __name__ = "length"

    def __init__(self, markers: Markers, eos_ids: set[int], max_length: int, cache: int):
        super().__init__(markers, eos_ids)
        self.max_length, self.cache = max_length, cache

    def score(self, reading, ids, row):
        n, free = len(ids), self.max_length - self.cache
        if n <= free:
            return 0.0
        return (free - n) / self.cache if n <= self.max_length else -1.0


BUILT_IN = {"format": FormatReward, "choice": ChoiceReward, "exact": ExactReward, "numeric": NumericReward,
            "length": LengthReward}
assert tuple(BUILT_IN) == REWARD_NAMES  # the recipe validates names against REWARD_NAMES without importing this


@dataclass(frozen=True)
class WeightedReward:
    name: str
    function: object
    weight: float


def build_rewards(recipe: Recipe, tokenizer, eos_ids: set[int]) -> list[WeightedReward]:
    """The recipe's rewards, in its order, weight 0 left out; a user's file imported from its explicit path."""
    markers = markers_for(tokenizer, recipe.data)
    g = recipe.grpo
    out = []
    for name, weight in g.rewards.items():
        if not weight:
            continue
        if name == "length":
            function = LengthReward(markers, eos_ids, g.max_completion_length,
                                    g.length_cache or max(1, g.max_completion_length // 4))
        elif name in BUILT_IN:
            function = BUILT_IN[name](markers, eos_ids)
        else:
            function = load_reward_file(name)
        out.append(WeightedReward(getattr(function, "__name__", name), function, float(weight)))
    names = [r.name for r in out]
    if len(set(names)) < len(names):
        raise UserError(f"grpo.rewards: two rewards have the same name ({', '.join(names)}).",
                        hint="Rename your function: its name labels its curve in metrics.jsonl and the report.")
    return out


def load_reward_file(reference: str):
    """`/abs/path/file.py:function` -> the function. Only the named file is imported (never a module on sys.path)."""
    path_text, _, function = reference.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"grpo.rewards: the reward file {path} does not exist.",
                        hint="Name it relative to the recipe's folder, e.g. \"my_rewards.py:score\" = 1.0.")
    spec = importlib.util.spec_from_file_location(f"qlora_kit_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: show its error in one line, not our traceback
        raise UserError(f"grpo.rewards: importing {path} failed: {type(e).__name__}: {e}",
                        hint="Fix the file (run `python FILE` to see the full error).") from None
    found = getattr(module, function, None)
    if not callable(found):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"grpo.rewards: {path} has no function `{function}`.",
                        hint=f"Functions in that file: {', '.join(names) or 'none'}.")
    return found
