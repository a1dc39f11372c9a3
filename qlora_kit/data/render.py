"""Turn a reasoning row into the text the model is trained on: a `prompt` and a `completion`.

The DeepSeek-R1-Distill chat template is a trap for reasoning data: it deletes everything up to
`</think>` from assistant messages, so rendering the reasoning as an assistant turn trains on
answers without reasoning. We use the template only for the prompt (the user turn plus the
generation prompt) and write the completion ourselves, in the layout the model produces at
inference: `<think>\\n{cot}\\n</think>\\n\\n{response}`, then EOS (added as a token id by encode.py).

Templates exist in two variants: older ones end the generation prompt at `<｜Assistant｜>`, newer
ones at `<｜Assistant｜><think>\\n`. The completion opens the think block only if the prompt did not,
so there is always exactly one `<think>`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from qlora_kit.data.rows import THINK_CLOSE, THINK_OPEN, Row
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import DataSection

PLAIN_TEMPLATE = "### Question:\n{question}\n\n### Reasoning:\n{cot}\n\n### Answer:\n{response}"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    """Everything the model learns to write (EOS is appended as a token id when encoding)."""
    answer_start: int = 0
    """Where the answer begins in `completion` (a character offset): before it the reasoning (the think block, or
    the template's reasoning part), from it on the answer. The eval loss is reported for both parts."""


Renderer = Callable[[Row], Pair]


def make_renderer(tokenizer, data: DataSection) -> tuple[Renderer, str]:
    """Pick the renderer for `data.format`. Returns (renderer, a one-line description of the layout)."""
    if data.format == "chat":
        if getattr(tokenizer, "chat_template", None):
            return _chat_renderer(tokenizer, data.system_prompt), "the model's chat template + <think> block"
        log.warning("The tokenizer has no chat template: using the plain format instead (data.format = 'plain').")
        return _template_renderer(PLAIN_TEMPLATE), "plain (tokenizer has no chat template)"
    if data.format == "plain":
        return _template_renderer(PLAIN_TEMPLATE), "plain"
    return _template_renderer(data.format), "custom template"


def _chat_renderer(tokenizer, system_prompt: str) -> Renderer:
    def render(row: Row) -> Pair:
        messages = [{"role": "user", "content": row.question}]
        if row.system or system_prompt:  # the row's own system turn wins over the recipe's
            messages.insert(0, {"role": "system", "content": row.system or system_prompt})
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template error is about the model's files, not our code
            raise UserError(f"The tokenizer's chat template failed on row {row.number}: {e}",
                            hint="Set data.format = 'plain' or a custom template to bypass it.") from None
        completion = think_completion(prompt, row.cot, row.response)
        # The answer starts right after </think>: the blank line that follows belongs to it.
        return Pair(prompt, completion, completion.index(THINK_CLOSE) + len(THINK_CLOSE))

    return render


def think_completion(prompt: str, cot: str, response: str) -> str:
    """The completion for a prompt from either template variant: one think block, never two or zero."""
    body = f"{cot}\n{THINK_CLOSE}\n\n{response}"
    if prompt.endswith(THINK_OPEN + "\n"):
        return body
    if prompt.endswith(THINK_OPEN):
        return "\n" + body
    return f"{THINK_OPEN}\n{body}"


def _template_renderer(template: str) -> Renderer:
    # Loss starts at the first of {cot}/{response}: everything before it is the prompt.
    cut = min(i for i in (template.find("{cot}"), template.find("{response}")) if i >= 0)
    prompt_part, completion_part = template[:cut], template[cut:]

    # The answer starts where {response} does (right after the separator, e.g. "### Answer:\n").
    reasoning_part = completion_part.split("{response}")[0] if "{response}" in completion_part else completion_part

    def render(row: Row) -> Pair:
        values = {"question": row.question, "cot": row.cot, "response": row.response}
        return Pair(prompt_part.format(**values), completion_part.format(**values),
                    len(reasoning_part.format(**values)))

    return render
