"""How a model's reply is read: where its reasoning ends, its answer, and whether it is in the trained format.

One reading for everything that judges a reply: chat's display, the samples' format count (samples.md, summary.json),
the evaluation's chosen letter (`eval --generate`) and GRPO's rewards. So "in the trained format" means one thing
everywhere, and it is the format the completions were rendered in (qlora_kit.data.render):

    chat format      <think> reasoning </think> answer EOS   (the prompt may already have opened <think>)
    plain / custom   reasoning {separator} answer EOS        (the text between {cot} and {response} in the template)
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_kit.data.render import PLAIN_TEMPLATE, THINK_CLOSE, THINK_OPEN
from qlora_kit.recipe.schema import DataSection


@dataclass(frozen=True)
class Markers:
    """Where a reply's reasoning ends (`separator`) and how the model opens it itself (`opener`)."""

    separator: str | None = THINK_CLOSE
    """Text between the reasoning and the answer; None when the format has no reasoning part."""
    opener: str | None = THINK_OPEN
    """Text that opens the reasoning when the model writes it itself (`<think>` in the chat format); None: the
    prompt's end is already inside the reasoning (plain and custom templates)."""

    def starts_inside(self, prompt: str) -> bool:
        """Does the reply start inside the reasoning: the prompt opened it (a newer R1 template ends with
        `<think>\\n`), or the format has no opener (plain and custom templates always do)?"""
        if self.separator is None:
            return False
        return self.opener is None or prompt.rstrip("\n").endswith(self.opener)


def markers_for(tokenizer, data: DataSection) -> Markers:
    """The markers of a run's data.format. The chat format with a tokenizer that has no chat template is rendered
    with the plain layout (qlora_kit.data.render.make_renderer), so it is read that way too."""
    if data.format == "chat" and getattr(tokenizer, "chat_template", None):
        return Markers(THINK_CLOSE, THINK_OPEN)
    template = data.format if data.format not in ("chat", "plain") else PLAIN_TEMPLATE
    return Markers(template_separator(template), None)


def template_separator(template: str) -> str | None:
    """The literal text between {cot} and {response} in a plain/custom template. None: no reasoning part, or only
    whitespace between the two, which cannot be told apart from the text itself."""
    cot, response = template.find("{cot}"), template.find("{response}")
    if cot < 0 or response < 0:
        return None
    return template[cot + len("{cot}"):response].strip() or None


@dataclass(frozen=True)
class Split:
    think: str
    answer: str
    opened: bool
    """The reply has a reasoning part: the prompt opened it, or the model wrote the opener itself."""
    closed: bool
    """The reasoning ended: the separator (`</think>`) was generated."""
    blocks: int = 1
    """Reasoning blocks opened or closed, the prompt's included: the trained format has exactly one."""


def split_think(text: str, separator: str | None = THINK_CLOSE, opener: str | None = THINK_OPEN,
                starts_inside: bool = True) -> Split:
    """A generated text split into its reasoning and its answer.

    - No separator in the format: all of it is the answer.
    - The reply did not start inside the reasoning and does not open it: a direct answer (no reasoning).
    - The reasoning never closes (out of tokens, or the model stopped): all of it is reasoning, no answer.
    Separators after the first (a model that closes its reasoning twice) are not part of the answer; `blocks`
    counts them, and a second opener, so the format check can refuse such a reply."""
    if separator is None:
        return Split("", text.strip(), opened=False, closed=False, blocks=0)
    text = text.lstrip()
    blocks = max((text.count(opener) if opener else 0) + starts_inside, text.count(separator))
    if opener and text.startswith(opener):
        text, starts_inside = text[len(opener):], True
    if not starts_inside:
        return Split("", text.replace(separator, "").strip(), opened=False, closed=False, blocks=blocks)
    think, found, answer = text.partition(separator)
    return Split(think.strip(), answer.replace(separator, "").strip() if found else "", opened=True,
                 closed=bool(found), blocks=blocks)


def read_reply(text: str, prompt: str, markers: Markers) -> Split:
    """A reply to `prompt`, split as the format says."""
    return split_think(text, markers.separator, markers.opener, markers.starts_inside(prompt))


def answer_part(split: Split) -> str | None:
    """What an answer check reads: the text after the reasoning; None when the reasoning never closed (the model ran
    out of tokens mid-thought). A direct answer (no reasoning at all) is read as it stands."""
    if split.opened and not split.closed:
        return None
    return split.answer


def in_format(split: Split, ended: bool, has_reasoning: bool = True) -> bool:
    """The trained format, whole: one reasoning block, opened and closed, then a non-empty answer, then EOS
    (`ended`) before the token limit. A format without a reasoning part asks only for the answer and the EOS."""
    reasoned = not has_reasoning or (split.opened and split.closed and split.blocks == 1)
    return reasoned and bool(split.answer) and ended


def stop_ids(model, tokenizer) -> set[int]:
    """The ids that end a reply: the model's own EOS ids and the tokenizer's EOS, which training appended to every
    completion (the model learned to stop there)."""
    eos = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
