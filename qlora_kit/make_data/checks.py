"""What every generated row must pass before it is kept, each refusal with the reason it is counted by.

    question   a question (ends with ? or ？), long enough to stand alone, not about "the passage", not a near-duplicate
               of any question of the whole job (earlier runs of it included)
    answer     not cut off at the token limit, an answer after the reasoning, reasoning present, no stray think tags
    grounding  the judge's score on the chunk at or above the threshold (checked by the caller with replies.read_score)

Near-duplicates: two questions whose character n-grams (after folding case, width and punctuation) overlap by
DUPLICATE_JACCARD or more: trigrams for English, bigrams for Chinese (a Chinese word is one to three characters, and
there are no spaces to split words at). An inverted index keeps each check to the questions sharing an n-gram.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

DUPLICATE_JACCARD = 0.6
"""Shared n-grams / all n-grams of two questions at which the second is a duplicate. Rephrasings score above it
("What causes hepatitis B?" / "What causes hepatitis B infection?" 0.68, "How is hepatitis B prevented?" / "How can
hepatitis B be prevented?" 0.62, "乙型肝炎是如何传播的？" / "乙型肝炎如何传播？" 0.60), different questions on one topic
well below ("How does hepatitis B spread?" / "What causes hepatitis B?" 0.35): tests/test_make_data_checks.py."""
MIN_QUESTION_CHARS = {"en": 12, "zh": 5}
PASSAGE_WORDS = re.compile(r"\b(the|this) (passage|text|document|excerpt|article)\b"
                           r"|(本文|文中|这段文字|该文档|上文|段落中)", re.I)


def language_of(text: str) -> str:
    """"zh" when CJK characters are more than a fifth of the letters, else "en"."""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    letters = len(re.findall(r"[A-Za-z]", text)) + cjk
    return "zh" if letters and cjk / letters > 0.2 else "en"


def question_problem(question: str) -> str:
    """Why a question is refused, or "" when it is fine."""
    text = question.strip()
    if not text:
        return "question: empty"
    if not text.endswith(("?", "？")):
        return "question: not a question (no question mark)"
    if len(text) < MIN_QUESTION_CHARS[language_of(text)]:
        return "question: too short to stand alone"
    if PASSAGE_WORDS.search(text):
        return "question: refers to the passage instead of its subject"
    return ""


def answer_problem(reasoning: str, answer: str, finish_reason: str | None) -> str:
    """Why an answer is refused, or "" when it is fine."""
    if finish_reason == "length":
        return "answer: cut off at the token limit"
    if not answer.strip():
        return "answer: empty (reasoning only)" if reasoning.strip() else "answer: empty"
    if not reasoning.strip():
        return "answer: no reasoning"
    if "<think>" in answer or "</think>" in answer:
        return "answer: stray think tags"
    return ""


def ngrams(text: str) -> set[str]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = re.sub(r"[\W_]+", " ", folded).strip()
    n = 2 if language_of(folded) == "zh" else 3
    if len(folded) < n:
        return {folded} if folded else set()
    return {folded[i:i + n] for i in range(len(folded) - n + 1)}


class QuestionIndex:
    """Every question kept so far in the job; `add` refuses a near-duplicate of any of them."""

    def __init__(self) -> None:
        self.grams: list[set[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)

    def duplicate_of(self, question: str) -> int | None:
        """The index of the kept question this one nearly repeats, or None."""
        grams = ngrams(question)
        shared: dict[int, int] = defaultdict(int)
        for gram in grams:
            for other in self.postings.get(gram, ()):
                shared[other] += 1
        for other, common in shared.items():
            if common / len(grams | self.grams[other]) >= DUPLICATE_JACCARD:
                return other
        return None

    def add(self, question: str) -> bool:
        """Keep the question unless it nearly repeats one already kept; True when kept."""
        if self.duplicate_of(question) is not None:
            return False
        grams = ngrams(question)
        for gram in grams:
            self.postings[gram].append(len(self.grams))
        self.grams.append(grams)
        return True
