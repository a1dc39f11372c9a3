"""A Word document's body as light Markdown, through python-docx: headings by style, lists, tables, in order.

A DOCX has no pages (Word lays them out when it opens the file), so the whole body is one page without a number.
Running headers and footers live in the sections' own parts, not in the body, so they never reach the text.
Footnotes, comments and text boxes are not read (python-docx has no API for them).
"""

from __future__ import annotations

import re
from pathlib import Path

from qlora_kit.errors import UserError

NOT_DOCX = ("not a readable DOCX ({error}): damaged, password-protected (Word encrypts those into another "
            "container) or not a Word file; open it in Word or LibreOffice and save it again as .docx")

# Built-in style names are stored in English whatever the language of Word ("heading 1" in a Chinese document)
_HEADING = re.compile(r"^(?:heading|标题)\s*([1-9])$", re.IGNORECASE)


def read_docx(path: Path) -> list[tuple[None, str]] | str:
    try:
        import docx
        from docx.table import Table
    except ImportError as error:
        raise UserError("python-docx is missing", [str(error)], hint='pip install "python-docx>=1.1"') from error
    try:
        document = docx.Document(str(path))
        blocks = [_table(block) if isinstance(block, Table) else _paragraph(block)
                  for block in document.iter_inner_content()]
    except Exception as error:  # python-docx raises zipfile, KeyError and lxml errors on broken files alike
        return NOT_DOCX.format(error=f"{type(error).__name__}: {error}")
    text = ""
    for block in filter(None, blocks):
        # A list's items go one a line; everything else is a paragraph of its own
        text += ("\n" if _last_line(text).startswith("- ") and block.startswith("- ") else "\n\n") + block
    return [(None, text.strip())] if text.strip() else []


def _last_line(text: str) -> str:
    return text.rsplit("\n", 1)[-1]


def _heading_level(paragraph) -> int | None:
    """The heading level of the paragraph's style, or of a style it is based on (a custom "My Heading")."""
    style = paragraph.style
    for _ in range(10):  # a style's base chain is short; the bound guards against a loop in a damaged file
        if style is None:
            return None
        name = (style.name or "").strip()
        if name.lower() == "title":
            return 1
        match = _HEADING.match(name)
        if match:
            return int(match.group(1))
        style = style.base_style
    return None


def _is_list_item(paragraph) -> bool:
    properties = paragraph._p.pPr
    numbered = properties is not None and properties.numPr is not None
    return numbered or (paragraph.style is not None and (paragraph.style.name or "").startswith("List"))


def _paragraph(paragraph) -> str:
    text = paragraph.text.replace("\t", " ").strip()
    if not text:
        return ""
    level = _heading_level(paragraph)
    if level:
        return "#" * level + " " + " ".join(text.split())
    if _is_list_item(paragraph):
        return "- " + text
    return text


def _table(table) -> str:
    """A table as Markdown rows; a merged cell counts once, not once for every grid column it spans."""
    rows = []
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:
            if cell._tc in seen:  # lxml elements hash by identity: the same grid cell, merged
                continue
            seen.add(cell._tc)
            cells.append(" ".join(cell.text.split()).replace("|", "\\|"))
        if any(cells):
            rows.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        rows.insert(1, "|" + " --- |" * rows[0].count(" | ") + " --- |")
    return "\n".join(rows)
