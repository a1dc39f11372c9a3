"""Documents in, pages of light Markdown out: the first step of `qlora-kit make-data`.

`find_documents` turns the command line's files and folders into a sorted list of files; `read_documents` reads
them one at a time, so a folder of a thousand PDFs streams. Each file becomes a `Document` (its pages, numbered for
a PDF) or a `Skipped` with a one-line reason the user can act on; one bad file never stops the others. The readers:
PDF through PDFium (`pdf_text.py`, headers and footers out in `page_cleanup.py`), DOCX through python-docx
(`docx_text.py`), HTML through lxml (`html_text.py`), Markdown and plain text as they are once decoded
(`text_decoding.py`: a BOM, else UTF-8, else GB18030).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.make_data.text_decoding import NOT_TEXT, decode_text

KINDS = {".pdf": "pdf", ".docx": "docx", ".md": "markdown", ".markdown": "markdown", ".txt": "text",
         ".text": "text", ".html": "html", ".htm": "html", ".xhtml": "html"}
# What to do instead, for the types people most often have
_CONVERT = {".doc": "save it as .docx", ".rtf": "save it as .docx", ".odt": "save it as .docx",
            ".pptx": "save it as PDF", ".ppt": "save it as PDF", ".epub": "convert it to HTML or PDF",
            ".png": "an image: OCR it into a PDF first, e.g. with ocrmypdf",
            ".jpg": "an image: OCR it into a PDF first, e.g. with ocrmypdf"}
EMPTY = "empty file"


@dataclass(frozen=True)
class Page:
    number: int | None
    """1-based page number in the PDF (the page's place in the file, not the label printed on it); None for
    formats without pages."""
    text: str
    """The page's text as light Markdown: headings as '#' lines where the format says so (DOCX styles, HTML h1-h6,
    Markdown), paragraphs separated by a blank line, running headers/footers/page numbers removed."""


@dataclass(frozen=True)
class Document:
    path: Path
    kind: str
    """"pdf" | "docx" | "markdown" | "text" | "html"."""
    pages: tuple[Page, ...]


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    """One line the user can act on, e.g. "encrypted PDF (...)", "empty file", "unsupported type .pptx (...)"."""


def supported() -> str:
    return ", ".join(KINDS)


def find_documents(sources: Iterable[Path]) -> list[Path]:
    """The files named and every file under the folders named (recursively), sorted, hidden ones left out.

    Every file is returned, readable or not: `read_documents` says why one is skipped, so a .pptx in the folder
    is reported rather than silently missing from the rows.
    """
    sources = [Path(source) for source in sources]
    missing = [str(source) for source in sources if not source.exists()]
    if missing:
        raise UserError("Document source not found", [f"{name}: no such file or folder" for name in missing],
                        hint="Give files or folders of documents (" + supported() + ").")
    found: set[Path] = set()
    for source in sources:
        if source.is_file():
            found.add(source)
            continue
        for path in source.rglob("*"):
            relative = path.relative_to(source).parts
            # Hidden: .git, .DS_Store, editors' ~$lock files of Word documents that are open
            if not any(part.startswith((".", "~$")) for part in relative) and path.is_file():
                found.add(path)
    return sorted(found)


def read_documents(paths: Iterable[Path]) -> Iterator[Document | Skipped]:
    """Each path read in turn as a `Document`, or a `Skipped` naming why not; the next file is read on demand."""
    for path in paths:
        yield read_document(Path(path))


def read_document(path: Path) -> Document | Skipped:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        what = f"unsupported type {path.suffix}" if path.suffix else "unsupported type (no file extension)"
        advice = _CONVERT.get(path.suffix.lower())
        return Skipped(path, f"{what} ({advice + '; ' if advice else ''}supported: {supported()})")
    try:
        if path.stat().st_size == 0:
            return Skipped(path, EMPTY)
        pages = _READERS[kind](path)
    except OSError as error:
        return Skipped(path, f"cannot be read: {error.strerror or error}")
    if isinstance(pages, str):
        return Skipped(path, pages)
    if not pages:
        return Skipped(path, EMPTY if kind in ("text", "markdown") else "no text in it")
    return Document(path, kind, tuple(Page(number, text) for number, text in pages))


def _read_text(path: Path) -> list[tuple[None, str]] | str:
    text = decode_text(path.read_bytes())
    if text is None:
        return NOT_TEXT
    text = _tidy_lines(text)
    return [(None, text)] if text else []


def _read_markdown(path: Path) -> list[tuple[None, str]] | str:
    text = decode_text(path.read_bytes())
    if text is None:
        return NOT_TEXT
    text = _tidy_lines(text)
    # YAML front matter is metadata for a site generator, not text to write questions about
    text = re.sub(r"\A---\n.*?\n(?:---|\.\.\.)\n", "", text, flags=re.DOTALL)
    # Setext headings ("Title" over "=====") as '#' lines, as the other formats give them
    text = re.sub(r"^(?=[^\s|>#-])(.+)\n=+[ \t]*$", r"# \1", text, flags=re.MULTILINE)
    text = re.sub(r"^(?=[^\s|>#-])(.+)\n-{2,}[ \t]*$", r"## \1", text, flags=re.MULTILINE)
    text = text.strip()
    return [(None, text)] if text else []


def _tidy_lines(text: str) -> str:
    """One kind of line end, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_pdf(path: Path):
    from qlora_kit.make_data.pdf_text import read_pdf

    return read_pdf(path)


def _read_docx(path: Path):
    from qlora_kit.make_data.docx_text import read_docx

    return read_docx(path)


def _read_html(path: Path):
    from qlora_kit.make_data.html_text import read_html

    return read_html(path)


_READERS = {"pdf": _read_pdf, "docx": _read_docx, "markdown": _read_markdown, "text": _read_text,
            "html": _read_html}
