"""Your own multiple-choice questions for `qlora-kit eval`: the reader lives in qlora_kit.data.choices (GRPO training
reads the same rows, and data/ is a stage before eval/); this module keeps the names eval/ has always used."""

from __future__ import annotations

from qlora_kit.data.choices import COLUMNS, LETTERS, Question, load_questions, parse_column_map

__all__ = ["COLUMNS", "LETTERS", "Question", "load_questions", "parse_column_map"]
