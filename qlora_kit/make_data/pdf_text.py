"""A PDF's text layer, page by page, through PDFium (pypdfium2): lines with their positions, then clean paragraphs.

PDFium was chosen for its text (see the make-data docs: Chinese read right where pypdf garbles it, hyphenation
breaks marked, 5-40x faster than the pure-Python readers on the same files) and its licence (Apache/BSD, a 9 MB
wheel for every platform). `get_text_range` gives the page's text in content-stream order with CRLF between lines
and U+FFFE where a word was hyphenated across a line end; the characters line up one to one with PDFium's
character indices, so one box and one origin per line give each line's position and font size cheaply.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from qlora_kit.make_data.page_cleanup import Line, page_text, strip_running_lines

NO_TEXT_LAYER = "scanned PDF: no text layer (run OCR first, e.g. ocrmypdf)"
ENCRYPTED = "encrypted PDF (it needs a password: save an unlocked copy, e.g. qpdf --decrypt)"

ONLY_RUNNING_LINES = ("no text besides running headers, footers and page numbers (a scan with a printed header? "
                      "run OCR first, e.g. ocrmypdf)")

_HYPHEN_MARK = "\ufffe"  # PDFium's mark for a hyphen it removed at a line end


def read_pdf(path: Path) -> list[tuple[int, str]] | str:
    """(page number, text) for each page with text, 1-based; or the reason the file cannot be read."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        document = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as error:
        # err_code came with pypdfium2 5; 4.30 (the newest wheel for macOS before 13) says it only in the message
        code = getattr(error, "err_code", None)
        if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY) or "password" in str(error).lower():
            return ENCRYPTED
        return f"not a readable PDF ({error}): damaged, or not a PDF despite its name"
    try:
        pages = [_page_lines(document[index], pdfium_c) for index in range(len(document))]
    finally:
        document.close()
    if not any(pages):
        return NO_TEXT_LAYER
    texts = [(number, page_text(lines)) for number, lines in enumerate(strip_running_lines(pages), start=1)]
    texts = [(number, text) for number, text in texts if text]
    return texts or ONLY_RUNNING_LINES


def _page_lines(page, pdfium_c) -> list[Line]:
    """The page's visual lines in the order PDFium reads them, each with its position and font size."""
    textpage = page.get_textpage()
    try:
        count = textpage.count_chars()
        # An explicit range: pypdfium2 4.x sends the no-argument call to get_text_bounded, whose text has no
        # one-to-one character indices
        text = textpage.get_text_range(0, count)
        if len(text) != count:
            # Never seen on real files; without the one-to-one indices the positions are unknown, so keep the
            # lines in order with no geometry (they are then joined as one paragraph per page).
            return [Line(line.strip(), 0.0, 0.0, -float(i), 10.0) for i, line in enumerate(text.splitlines())
                    if line.strip()]
        lines = []
        x, y = ctypes.c_double(), ctypes.c_double()
        for match in re.finditer(r"[^\r\n]+", text):
            pieces = match.group().split(_HYPHEN_MARK)
            start = match.start()
            for number, piece in enumerate(pieces):
                first = start + len(piece) - len(piece.lstrip())
                last = start + len(piece.rstrip()) - 1
                start += len(piece) + 1
                if last < first:
                    continue
                pdfium_c.FPDFText_GetCharOrigin(textpage.raw, first, ctypes.byref(x), ctypes.byref(y))
                x0 = textpage.get_charbox(first)[0]
                x1 = textpage.get_charbox(last)[2]
                size = pdfium_c.FPDFText_GetFontSize(textpage.raw, first)
                clean = _CONTROL.sub("", piece.strip())
                if clean:
                    lines.append(Line(clean, x0, x1, y.value, size, hyphen_break=number < len(pieces) - 1))
        return lines
    finally:
        textpage.close()
        page.close()


# Control characters PDFium leaves in (form feeds, the STX some producers use for soft hyphens)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
