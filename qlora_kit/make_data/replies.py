"""The teacher's replies read strictly: a numbered list of questions, the reasoning and the answer, a score.

Strict means a reply that is not in the asked form is refused with a reason (and asked again once, by the caller),
never guessed at: a reply cut mid-list, prose around a list, or a score out of range each have a name, and every
refusal is counted by it. Two repairs are allowed because they lose nothing: a list the teacher wrapped in a code
fence or in JSON (`{"questions": [...]}`, what many models do unasked) is read as the list it is.

The reasoning comes from where the teacher puts it: a reasoning model's own chain of thought in the reply's
`reasoning_content` (DeepSeek's API, vLLM, llama-server, SiliconFlow) or `reasoning` (Ollama, OpenRouter) field, or a
leading <think> block in the text (R1 distills served plainly); a teacher that has neither was asked for a <think>
block by the answer prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

NUMBERED = re.compile(r"^\s*(?:\*\*)?(\d{1,2})\s*[.)、．:：](?:\*\*)?\s*(.+?)\s*$")
FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SCORE = re.compile(r"(?:score|评分|分数)\s*(?:\*\*)?\s*[:：=]?\s*(?:\*\*)?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.I)


class Refused(ValueError):
    """A reply not in the asked form; `reason` is the name it is counted by."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_questions(content: str) -> list[str]:
    """The questions of a numbered list ("1. ...", "2) ...", "1、..."), in order; or of a JSON list."""
    text = FENCE.sub("", content.strip()).strip()
    if text.startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise Refused("questions: broken JSON") from None
        items = parsed.get("questions") if isinstance(parsed, dict) else parsed
        if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
            raise Refused("questions: JSON without a list of questions")
        return [q.strip() for q in items if q.strip()]
    questions = [found.group(2).strip().strip('"“”') for line in text.splitlines() if (found := NUMBERED.match(line))]
    if not questions:
        raise Refused("questions: no numbered list")
    return questions


@dataclass(frozen=True)
class Answer:
    reasoning: str
    answer: str
    reasoning_from: str
    """Where the reasoning came from: "reasoning field", "<think> block", "asked after the answer" (generate.py's
    follow-up to a teacher that gave none) or "" (none)."""


def read_answer(content: str, reasoning_field: str = "") -> Answer:
    """The reply's reasoning and answer. A <think> block in the text is taken out of the answer in every case (a
    reasoning model may also follow the prompt's request for one)."""
    content = (content or "").strip()
    think = ""
    if THINK_CLOSE in content:
        before, _, after = content.partition(THINK_CLOSE)
        # A prompt that opened <think> itself leaves the reply starting inside the block (no opener in the text).
        think, content = before.replace(THINK_OPEN, "").strip(), after.replace(THINK_CLOSE, "").strip()
    elif content.startswith(THINK_OPEN):
        return Answer(content[len(THINK_OPEN):].strip(), "", "<think> block")  # never closed: no answer
    reasoning_field = (reasoning_field or "").strip()
    if reasoning_field:
        return Answer(reasoning_field, content, "reasoning field")
    return Answer(think, content, "<think> block" if think else "")


def read_score(content: str) -> int:
    """The judge's 1-10 score: "Score: 8" (also "Score: 8/10", "**Score:** 8", "评分：8", or JSON {"score": 8})."""
    text = FENCE.sub("", (content or "").strip()).strip()
    value = None
    if text.startswith("{"):
        try:
            value = json.loads(text).get("score")
        except (json.JSONDecodeError, AttributeError):
            raise Refused("judge: broken JSON") from None
    else:
        found = SCORE.search(text)
        value = found.group(1) if found else None
    if value is None:
        raise Refused("judge: no score")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise Refused("judge: no score") from None
    if not 1 <= score <= 10 or score != int(score):
        raise Refused("judge: score not a whole number from 1 to 10")
    return int(score)


def reasoning_of(message) -> str:
    """A chat message's reasoning field, whichever name the server gives it (absent: "")."""
    extra = getattr(message, "model_extra", None) or {}
    for name in ("reasoning_content", "reasoning"):
        value = getattr(message, name, None) or extra.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return ""
