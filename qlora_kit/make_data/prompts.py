"""The teacher's prompts: text files a user can read and edit (English and Chinese defaults in prompts/en, prompts/zh).

    questions.txt        a chunk -> a numbered list of questions            {document} {where} {text} {count}
    questions_retry.txt  the follow-up when that reply was not such a list  {problem} {count}
    answer.txt           a chunk + one question -> reasoning and answer     {document} {where} {text} {question}
    reasoning.txt        the follow-up when the answer came without reasoning (a small teacher ignores <think>)
    judge.txt            chunk + question + answer -> "Score: N" and why    {text} {question} {answer}
    judge_retry.txt      the follow-up when that reply had no score         {problem}

`qlora-kit make-data --export-prompts DIR` writes the defaults to DIR (en/ and zh/); `--prompts DIR` reads them back
from there, falling back to the defaults for any file DIR lacks. A placeholder a template does not know is refused
before any request, naming the file.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError

DEFAULTS = Path(__file__).resolve().parent / "prompts"
LANGUAGES = ("en", "zh")
PLACEHOLDERS = {
    "questions": {"document", "where", "text", "count"},
    "questions_retry": {"problem", "count"},
    "answer": {"document", "where", "text", "question"},
    "reasoning": set(),
    "judge": {"text", "question", "answer"},
    "judge_retry": {"problem"},
}


@dataclass(frozen=True)
class Prompts:
    lang: str
    texts: dict[str, str]
    files: dict[str, Path]

    def fill(self, name: str, **values) -> str:
        return self.texts[name].format_map(values).strip()

    def where(self, chunk) -> str:
        """" (pages 3-4, under "Hepatitis B")": the place of a chunk in its document, in the prompt's language."""
        parts = []
        if self.lang == "zh":
            if chunk.pages:
                parts.append(f"第 {chunk.pages} 页")
            if chunk.heading:
                parts.append(f"“{chunk.heading}”一节")
            return f"（{'，'.join(parts)}）" if parts else ""
        if chunk.pages:
            parts.append(f"page{'s' if '-' in chunk.pages else ''} {chunk.pages}")
        if chunk.heading:
            parts.append(f'under "{chunk.heading}"')
        return f" ({', '.join(parts)})" if parts else ""


def load_prompts(lang: str, folder: Path | None = None) -> Prompts:
    """The prompts of one language: the user's files where `folder` has them, the defaults otherwise."""
    texts, files = {}, {}
    for name, allowed in PLACEHOLDERS.items():
        own = folder / lang / f"{name}.txt" if folder else None
        path = own if own and own.is_file() else DEFAULTS / lang / f"{name}.txt"
        text = path.read_text(encoding="utf-8-sig")
        used = set(re.findall(r"(?<!\{)\{([a-z_]+)\}(?!\})", text))
        unknown, missing = used - allowed, {"text"} & allowed - used
        if unknown or missing:
            problems = [f"unknown placeholder {{{name}}}" for name in sorted(unknown)]
            problems += [f"no {{{name}}}: the teacher would never see the passage" for name in sorted(missing)]
            raise UserError(f"Prompt file {path}:", problems,
                            hint=f"It may use {', '.join('{' + p + '}' for p in sorted(allowed))}; write a literal "
                                 "brace as {{ or }}.")
        texts[name], files[name] = text, path
    return Prompts(lang, texts, files)


def export_prompts(folder: Path) -> list[Path]:
    """Copy the default prompts into `folder` (en/, zh/) to be edited; an existing file is never overwritten."""
    written = []
    for lang in LANGUAGES:
        (folder / lang).mkdir(parents=True, exist_ok=True)
        for name in PLACEHOLDERS:
            target = folder / lang / f"{name}.txt"
            if not target.exists():
                shutil.copyfile(DEFAULTS / lang / f"{name}.txt", target)
                written.append(target)
    return written
