"""An HTML page's content as light Markdown, through lxml's HTML parser (libxml2: forgiving of real-world tag soup).

Only what a reader of the page reads is kept: scripts, styles, forms and the site's chrome (nav, aside, a
page-level header or footer, as a tag or a class, elements whose class or id says navigation, menu, sidebar,
breadcrumb or toc, ARIA navigation and banner roles) are dropped; with one <main>, only it is read. h1-h6 become
'#' lines, list items '- ' lines, table rows '| a | b |' lines, <pre> a fenced block; the rest is paragraphs with
HTML's whitespace collapsed (a line break in the source between two Chinese characters is no space at all, as a
browser shows it).
"""

from __future__ import annotations

import re
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.make_data.text_decoding import decode_text

_DROP = {"script", "style", "noscript", "template", "nav", "aside", "form", "svg", "iframe", "button", "select",
         "textarea", "object", "embed", "canvas", "map", "dialog", "head", "title", "meta", "link"}
_DROP_ROLES = {"navigation", "banner", "contentinfo", "search", "menu", "menubar", "complementary"}
_CHROME = re.compile(
    r"^(?:nav\w*|\w*-?nav(?:bar)?|menu\w*|sidebar\w*|breadcrumbs?|skip-?link|cookie\w*|(?:\w+-)?toc)$", re.IGNORECASE)
_BLOCKS = {"p", "div", "section", "article", "main", "body", "ul", "ol", "dl", "dt", "dd", "table", "thead",
           "tbody", "tfoot", "blockquote", "figure", "figcaption", "address", "details", "summary", "caption",
           "center", "hr", "header", "footer", "fieldset", "legend", "li", "tr", "pre"}
_CJK = "\u2e80-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def read_html(path: Path) -> list[tuple[None, str]] | str:
    try:
        import lxml.html
    except ImportError as error:
        raise UserError("lxml is missing", [str(error)], hint='pip install "lxml>=5"') from error
    data = path.read_bytes()
    text = _decoded(data)
    if text is None:
        return "not UTF-8 or GB18030 text and no <meta charset> that decodes it (save it as UTF-8)"
    # lxml refuses a str that still carries an XML encoding declaration (XHTML); the text is decoded already
    text = re.sub(r"\A\s*<\?xml[^>]*\?>", "", text)
    if not text.strip():
        return []
    try:
        root = lxml.html.document_fromstring(text)
    except Exception as error:  # lxml.etree.ParserError ("Document is empty") and friends
        return f"not readable as HTML ({error})"
    mains = root.findall(".//main")
    blocks = _Blocks()
    blocks.walk(mains[0] if len(mains) == 1 else root, inside_content=len(mains) == 1)
    body = "\n\n".join(blocks.done).strip()
    return [(None, body)] if body else []


def _decoded(data: bytes) -> str | None:
    """The page's own <meta charset> first (a GBK page says so), then the same guesses as a text file."""
    declared = _META_CHARSET.search(data[:4096])
    if declared:
        try:
            return data.decode(declared.group(1).decode("ascii"))
        except (LookupError, UnicodeDecodeError):
            pass
    return decode_text(data)


def _chrome(element) -> bool:
    if element.get("role", "").lower() in _DROP_ROLES or element.get("aria-hidden") == "true":
        return True
    names = (element.get("class") or "").split() + (element.get("id") or "").split()
    return any(_CHROME.match(name) for name in names)


def _page_furniture(element) -> bool:
    """A page-level header or footer: the tag, or a div of that class (texinfo's "Next: ... Previous: ..." bar)."""
    if not isinstance(element.tag, str):
        return False
    return element.tag in ("header", "footer") or bool({"header", "footer"} & set((element.get("class") or "").split()))


def _inline(text: str) -> str:
    """HTML whitespace rules: any run of whitespace is one space, and none between two Chinese characters."""
    text = re.sub(rf"(?<=[{_CJK}])\s*\n\s*(?=[{_CJK}])", "", text)
    return re.sub(r"\s+", " ", text)


class _Blocks:
    """Walks the tree, gathering inline text into the current block and closing it at each block element."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.current: list[str] = []
        self.prefix = ""

    def close(self) -> None:
        """End the current block; a list item's "- " waits for its first text (<li><p>text</p></li>)."""
        text = re.sub(r" *\n *", "\n", "".join(self.current)).strip()
        if text:
            if self.prefix == "- " and self.done and self.done[-1].rsplit("\n", 1)[-1].startswith("- "):
                self.done[-1] += "\n- " + text  # the items of a list one a line
            else:
                self.done.append(self.prefix + text)
            self.prefix = ""
        self.current = []

    def walk(self, element, inside_content: bool = False) -> None:
        tag = element.tag if isinstance(element.tag, str) else ""  # comments and processing instructions: ""
        if tag in _DROP or (tag and _chrome(element)) or (_page_furniture(element) and not inside_content):
            return
        inside_content = inside_content or tag in ("article", "main")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.close()
            heading = _inline(element.text_content()).strip()
            if heading:
                self.done.append("#" * int(tag[1]) + " " + heading)
            return
        if tag == "pre":
            self.close()
            code = element.text_content().strip("\n")
            if code.strip():
                self.done.append("```\n" + code + "\n```")
            return
        if tag == "tr":
            self.close()
            cells = [_inline(cell.text_content()).strip().replace("|", "\\|") for cell in element
                     if isinstance(cell.tag, str) and cell.tag in ("td", "th")]
            if any(cells):
                self._row("| " + " | ".join(cells) + " |")
            return
        if tag == "br":
            self.current.append("\n")
            return
        block = tag in _BLOCKS
        if block:
            self.close()
            if tag == "li":
                self.prefix = "- "
            elif tag == "blockquote":
                self.prefix = "> "
        if tag and element.text:
            self.current.append(_inline(element.text))
        for child in element:
            self.walk(child, inside_content)
            if child.tail:
                self.current.append(_inline(child.tail))
        if block:
            self.close()
            self.prefix = ""

    def _row(self, row: str) -> None:
        """Rows of one table stay together as one block, not a blank line apart."""
        if self.done and self.done[-1].startswith("| ") and self.done[-1].endswith(" |"):
            self.done[-1] += "\n" + row
        else:
            self.done.append(row)
