"""A PDF page's lines into paragraphs: running headers, footers and page numbers out, wrapped lines joined.

PDFs keep no paragraphs, only positioned lines, so both jobs read geometry. A line is a running header or footer
when it sits at the top or bottom edge of its page and is one of: a bare page number ("3", "- 3 -", "Page 3 of 10",
"第 3 页", "iv"); a line whose digit-masked shape comes back at the same height at the edges of at least half
of the pages ("Report 2024 — page #"); or, outermost, a short line that starts or ends with the page's own printed
number, the number that follows the page index by an offset several pages share (a book's "Chapter 3: Objects 15"
changes with every chapter, so repetition alone misses it). Lines are then joined: a gap wider than the line
pitch, a change of font size (a heading) or an indented line after a line that ended early starts a paragraph;
pdfium's mark of a hyphenated line end joins the word halves; lines of Chinese text join without a space, others
with one.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class Line:
    """One visual line of a page, in the PDF's own coordinates (points, y grows upwards)."""

    text: str
    x0: float
    x1: float
    baseline: float
    size: float  # font size of its first character
    hyphen_break: bool = False  # the line ended in a hyphenated word that goes on at the next line


# How many lines from each edge may be headers/footers: a header is one or two lines (title, then a rule or a date).
EDGE_LINES = 3

_PAGE_NUMBER = re.compile(
    r"^(?:"
    r"[-–—~·•|\s]*\d{1,5}[-–—~·•|\s]*"  # 3, - 3 -, — 3 —, | 3 |
    r"|(?:page|p\.|pg\.?|seite|página|pagina)\s*\d{1,5}(?:\s*(?:of|/|von|de|di)\s*\d{1,5})?"  # Page 3, Page 3 of 10
    r"|\d{1,5}\s*(?:/|of)\s*\d{1,5}"  # 3 / 10, 3 of 10
    r"|第\s*\d{1,5}\s*页(?:\s*[,，/]?\s*共\s*\d{1,5}\s*页)?"  # 第 3 页, 第3页 共10页
    r"|共\s*\d{1,5}\s*页\s*[,，]?\s*第\s*\d{1,5}\s*页"  # 共 10 页 第 3 页
    r")$",
    re.IGNORECASE,
)
_LEADING_NUMBER = re.compile(r"^(\d{1,5})\s")
_TRAILING_NUMBER = re.compile(r"\s(\d{1,5})$")
_LEADING_ROMAN = re.compile(r"^([ivxlc]{1,7})\s")
_TRAILING_ROMAN = re.compile(r"\s([ivxlc]{1,7})$")
# Ligatures as letters; the bullets Word's Symbol and Wingdings fonts put in the private use area as real bullets
_LETTERS = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st",
                          "\uf0b7": "•", "\uf0a7": "▪", "\uf0d8": "➢", "\uf0fc": "✓", "\uf06e": "■", "\uf076": "❖"})
_CJK = re.compile(r"[\u2e80-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_SENTENCE_END = tuple(".!?:;。！？：；…”」』)")


_BARE_ROMAN = re.compile(r"^[-–—\s]*([ivxlc]{1,7})[-–—\s]*$")  # front matter is numbered i, ii, iii, iv


def is_page_number(text: str) -> bool:
    """A line that is nothing but a page number, in any of the usual dresses."""
    text = text.strip()
    roman = _BARE_ROMAN.match(text)
    return bool(_PAGE_NUMBER.match(text)) or bool(roman and _roman_value(roman.group(1)))


def _shape(text: str) -> str:
    """The line with its numbers masked, so "Report — page 3" and "Report — page 4" are the same line."""
    return re.sub(r"\d+", "#", re.sub(r"\s+", " ", text.strip().lower()))


def _place(line: Line) -> tuple[str, int]:
    return _shape(line.text), round(line.baseline / 2)


def _roman(value: int) -> str:
    digits = ((100, "c"), (90, "xc"), (50, "l"), (40, "xl"), (10, "x"), (9, "ix"), (5, "v"), (4, "iv"), (1, "i"))
    out = ""
    for amount, letters in digits:
        while value >= amount:
            out, value = out + letters, value - amount
    return out


def _roman_value(text: str) -> int | None:
    """The value of a lower-case roman numeral written the canonical way ("iv", not "iiii"), else None."""
    values = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}
    total = 0
    for ch, after in zip(text, text[1:] + " ", strict=True):
        total += -values[ch] if values.get(after, 0) > values[ch] else values[ch]
    return total if 0 < total < 400 and _roman(total) == text else None


def _edge_numbers(text: str) -> list[tuple[str, int]]:
    """Numbers at the start or end of a line, as (kind, value): where a running header keeps its page number."""
    found = []
    for pattern, kind in ((_LEADING_NUMBER, "arabic"), (_TRAILING_NUMBER, "arabic"),
                          (_LEADING_ROMAN, "roman"), (_TRAILING_ROMAN, "roman")):
        match = pattern.search(text.strip())
        if match:
            value = int(match.group(1)) if kind == "arabic" else _roman_value(match.group(1))
            if value:
                found.append((kind, value))
    return found


def _edges(lines: list[Line]) -> tuple[list[Line], list[Line]]:
    """The candidate lines from the top edge (outermost first) and from the bottom edge (outermost first)."""
    by_height = sorted(lines, key=lambda line: -line.baseline)
    return by_height[:EDGE_LINES], by_height[::-1][:EDGE_LINES]


def strip_running_lines(pages: list[list[Line]]) -> list[list[Line]]:
    """Each page's lines without its running header, footer and page number (the pages are one document's)."""
    with_text = [lines for lines in pages if lines]
    places: Counter[tuple[str, int]] = Counter()
    offsets: Counter[tuple[str, str, int]] = Counter()
    for index, lines in enumerate(pages, start=1):
        top, bottom = _edges(lines)
        edge = {id(line): line for line in top + bottom}.values()
        places.update({_place(line) for line in edge if not is_page_number(line.text)})
        # By side: a book numbered in its headers can still have a footnote "4 ..." at the foot of page 4
        offsets.update({(side, kind, value - index) for side, lines_there in (("top", top), ("bottom", bottom))
                        for line in lines_there[:1] for kind, value in _edge_numbers(line.text)})
    # A running line is printed at the same height on every page; on half of the pages at least, so that a heading
    # that happens to open a few pages is not taken for one. Heights are kept in 2-point steps, and a line one step
    # off still counts (a header at 800.9 and one at 801.1 points).
    repeated = {(shape, step) for (shape, step) in places
                if sum(places[shape, near] for near in (step - 1, step, step + 1)) >= max(2, len(with_text) / 2)}
    # Three pages (two in a two-page file) whose outermost line at one edge has a number that follows the page
    # index by the same offset: that is the printed page number, whatever text the header puts around it.
    shared = {key for key, count in offsets.items() if count >= min(3, max(2, len(with_text)))}

    def running(line: Line, index: int, side: str, outermost: bool) -> bool:
        if is_page_number(line.text) or _place(line) in repeated:
            return True
        return outermost and len(line.text) <= 120 and any(
            (side, kind, value - index) in shared for kind, value in _edge_numbers(line.text))

    cleaned = []
    for index, lines in enumerate(pages, start=1):
        removed: set[int] = set()
        for side, edge in zip(("top", "bottom"), _edges(lines), strict=True):
            for depth, line in enumerate(edge):
                if id(line) in removed:
                    continue
                if not running(line, index, side, outermost=depth == 0):
                    break
                removed.add(id(line))
        cleaned.append([line for line in lines if id(line) not in removed])
    return cleaned


def _joined(left: str, right: str, hyphen_break: bool) -> str:
    if hyphen_break:  # pdfium took the hyphen out and marked the break: one word again
        return left + right
    if left.endswith("-") and left[-2:-1].isalpha():  # a hyphen the producer kept: "state-of-the-" + "art"
        return left + right
    if _CJK.match(left[-1:]) or _CJK.match(right[:1]):  # Chinese has no spaces between words
        return left + right
    return left + " " + right


def _word_width(line: Line) -> float:
    """A rough width of the line's first word, in points: would it have fitted at the end of the line before?"""
    first = line.text.split(" ", 1)[0]
    if _CJK.match(first[:1]):
        return line.size  # one Chinese character is the unit a Chinese line can break at
    return 0.5 * line.size * len(first)


def _break(before: Line, after: Line, pitch: float, right: float) -> str:
    """How `after` follows `before`: "paragraph", "line" (a line break kept) or "join" (the same paragraph)."""
    gap = before.baseline - after.baseline
    size = max(before.size, after.size, 1.0)
    if before.hyphen_break:
        return "join"
    if gap < -0.3 * size or gap > 1.3 * pitch or abs(before.size - after.size) > 0.12 * size:
        return "paragraph"  # a new column, a blank line's worth of space, or a heading's bigger (or smaller) type
    if abs(gap) <= 0.3 * size:
        return "join"  # the same baseline, cut into two lines by the extraction (a table row, a footnote mark)
    ended_early = before.x1 + 0.5 * size + _word_width(after) < right
    indented = after.x0 > before.x0 + 0.8 * size
    if ended_early:
        return "paragraph" if indented or before.text.endswith(_SENTENCE_END) else "line"
    return "line" if indented else "join"


def page_text(lines: list[Line]) -> str:
    """A page's lines, in reading order, as paragraphs separated by a blank line."""
    if not lines:
        return ""
    gaps = [a.baseline - b.baseline for a, b in pairwise(lines)
            if abs(a.size - b.size) <= 0.12 * max(a.size, 1.0) and 0.3 * a.size < a.baseline - b.baseline < 3 * a.size]
    pitch = statistics.median(gaps) if gaps else 1.2 * statistics.median(line.size for line in lines)
    # The text column's right edge: most lines of a justified or ragged paragraph end near it.
    ends = sorted(line.x1 for line in lines)
    right = ends[int(0.8 * (len(ends) - 1))]
    text = lines[0].text
    for before, after in pairwise(lines):
        kind = _break(before, after, pitch, right)
        if kind == "join":
            text = _joined(text, after.text, before.hyphen_break)
        else:
            text += ("\n\n" if kind == "paragraph" else "\n") + after.text
    return tidy(text)


def tidy(text: str) -> str:
    """Ligatures as letters, symbol-font bullets as bullets, one space for a run, none at line ends, at most one
    blank line in a row."""
    text = text.translate(_LETTERS).replace("\u00ad", "").replace("\ufffe", "")
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
