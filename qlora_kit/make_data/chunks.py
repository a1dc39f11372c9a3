"""Pages -> chunks the teacher reads: measured in the student's tokens, cut at headings and paragraphs, with overlap,
each with the pages it came from and its side of the held-out split.

    Document pages ─► blocks (paragraphs and '#' headings, each with its page) ─► sections (a heading starts one)
        ─► the held-out split: whole documents (or, for a single document, whole sections) ─► chunks

Why the split comes before the chunks: chunks overlap, so a chunk cut across the boundary of the split would put the
same text on both sides, and the eval loss after training would measure memory. A chunk never spans two documents
or two sides of the split; overlap only repeats text of the same section.

Why the student's tokens: what the rows cost in training is counted in them, and the chunk budget is derived from
the teacher's context (chunk + prompt + reply must fit it) through a margin, because the teacher's tokenizer is not
known (qlora_kit.make_data.cli sizes it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qlora_kit.make_data.documents import Document

HEADING = re.compile(r"^(#{1,6})\s+\S")
SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")
SMALLEST_CUT = 1 / 3
"""A heading ends the current chunk once that chunk holds this share of the budget; a shorter one runs on into the
next section (a chunk per two-line section would cost a teacher request for nothing)."""


@dataclass(frozen=True)
class Block:
    page: int | None
    text: str
    tokens: int
    section: int
    """Index of the section in its document: a heading starts a new one."""
    heading: bool


@dataclass(frozen=True)
class Chunk:
    id: str
    """Stable over runs: the source and the text, hashed. A resumed job finds its chunks by it."""
    source: str
    """The document, as the user named it (relative to where the command runs when it can be)."""
    first_page: int | None
    last_page: int | None
    heading: str
    """The heading the chunk sits under ("" before the first one)."""
    text: str
    tokens: int
    split: str
    """"train" or "eval": held out by document (or by section of a single document)."""
    index: int
    """Its place in its document."""

    @property
    def pages(self) -> str:
        if self.first_page is None:
            return ""
        return str(self.first_page) if self.first_page == self.last_page else f"{self.first_page}-{self.last_page}"


def blocks_of(document: Document, count: Callable[[str], int]) -> list[Block]:
    """Paragraphs and headings of every page, in order, with their page and section."""
    blocks, section = [], 0
    for page in document.pages:
        for text in (part.strip() for part in re.split(r"\n\s*\n", page.text)):
            if not text:
                continue
            heading = bool(HEADING.match(text)) and "\n" not in text
            if heading and blocks:
                section += 1
            blocks.append(Block(page.number, text, count(text), section, heading))
    return blocks


def split_long(block: Block, budget: int, count: Callable[[str], int]) -> list[Block]:
    """A paragraph longer than the budget, cut at sentence ends (then at the budget's share of characters, for text
    without any: a table, a list without stops)."""
    if block.tokens <= budget:
        return [block]
    pieces, current = [], ""
    for sentence in (s for s in SENTENCE_END.split(block.text) if s):
        joined = f"{current} {sentence}".strip() if current and not _cjk(sentence) else current + sentence
        if current and count(joined) > budget:
            pieces.append(current)
            current = sentence
        else:
            current = joined
    pieces.append(current)
    out = []
    for piece in pieces:
        tokens = count(piece)
        while tokens > budget:  # no sentence end inside the budget: cut by characters, proportionally
            cut = max(1, len(piece) * budget // tokens)
            out.append(piece[:cut])
            piece = piece[cut:]
            tokens = count(piece)
        out.append(piece)
    return [Block(block.page, text, count(text), block.section, False) for text in out if text.strip()]


def _cjk(text: str) -> bool:
    return bool(re.match(r"[\u3000-\u9fff\uff00-\uffef]", text))


def held_out_units(documents: list[tuple[Document, list[Block]]], share: float) -> set[tuple[str, int | None]]:
    """What goes to the eval side: (document, None) for whole documents, or (document, section) when there is only
    one document. Chosen by a hash of the names (stable, and not the first or last by accident) until `share` of the
    blocks is held out; at least one unit when there are two or more, never all of them."""
    if share <= 0:
        return set()
    if len(documents) >= 2:
        units = [((str(doc.path), None), len(blocks)) for doc, blocks in documents]
    else:
        doc, blocks = documents[0]
        sizes: dict[int, int] = {}
        for block in blocks:
            sizes[block.section] = sizes.get(block.section, 0) + 1
        units = [((str(doc.path), section), size) for section, size in sizes.items()]
    if len(units) < 2:
        return set()
    total = sum(size for _, size in units)
    chosen, held = set(), 0
    for unit, size in sorted(units, key=lambda u: hashlib.sha1(repr(u[0]).encode()).hexdigest()):
        if held >= share * total or len(chosen) == len(units) - 1:
            break
        chosen.add(unit)
        held += size
    return chosen


def chunk_documents(documents: Iterable[Document], count: Callable[[str], int], budget: int, overlap: int,
                    eval_share: float, name: Callable[[Document], str] = lambda d: str(d.path)) -> list[Chunk]:
    """Every document's chunks, in order, each at most `budget` tokens (a heading line of context included)."""
    blocked = [(doc, blocks) for doc in documents if (blocks := blocks_of(doc, count))]
    held_out = held_out_units(blocked, eval_share)
    chunks = []
    for doc, blocks in blocked:
        def side(block: Block, doc=doc) -> str:
            return "eval" if {(str(doc.path), None), (str(doc.path), block.section)} & held_out else "train"

        chunks += pack(doc, name(doc), blocks, side, count, budget, overlap)
    return chunks


def pack(doc: Document, source: str, blocks: list[Block], side, count, budget: int, overlap: int) -> list[Chunk]:
    """The blocks of one document as chunks. Sizes are counted on the chunk's own text (joined, its heading line in
    front), not summed per block: joining paragraphs changes the tokens at the seams."""
    chunks: list[Chunk] = []
    current: list[Block] = []
    headings: dict[int, str] = {}

    def text_of(part: list[Block]) -> tuple[str, str]:
        heading = headings.get(part[0].section, "")
        body = [b.text for b in part]
        if heading and not part[0].heading:  # a chunk that starts mid-section says where it is
            body.insert(0, heading)
        return "\n\n".join(body), heading

    def close() -> None:
        if not any(not b.heading for b in current):  # headings alone teach nothing
            return
        text, heading = text_of(current)
        pages = [b.page for b in current if b.page is not None]
        digest = hashlib.sha1(f"{source}\n{text}".encode()).hexdigest()[:12]
        chunks.append(Chunk(digest, source, min(pages, default=None), max(pages, default=None),
                            heading.lstrip("# "), text, count(text), side(current[0]), len(chunks)))

    for whole in blocks:
        if whole.heading:
            headings[whole.section] = whole.text
        context = count(headings.get(whole.section, "")) if not whole.heading else 0
        for block in split_long(whole, max(budget - context - 8, 16), count):
            # Never across the held-out split; at a heading once the chunk holds a third of the budget.
            other_side = current and side(block) != side(current[-1])
            new_section = current and block.section != current[-1].section
            if other_side or new_section and count(text_of(current)[0]) >= SMALLEST_CUT * budget:
                close()
                current = []
            elif current and count(text_of([*current, block])[0]) > budget:
                close()
                # Overlap: the last paragraphs of the chunk just closed, as many as fit `overlap`, same section only.
                kept: list[Block] = []
                for previous in reversed(current):
                    if previous.section != block.section or previous.heading or \
                            sum(b.tokens for b in kept) + previous.tokens > overlap:
                        break
                    kept.insert(0, previous)
                current = kept if kept and count(text_of([*kept, block])[0]) <= budget else []
            current.append(block)
    if current:
        close()
    return chunks
