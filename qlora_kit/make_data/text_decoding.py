"""Bytes of a text file as text: a BOM says the encoding; else UTF-8; else GB18030.

GB18030 is the superset of GBK and GB2312, what Chinese editions of Windows editors save by default; it is tried
only after UTF-8 fails, and it fails itself on most bytes of other legacy encodings (Latin-1's "é" then ASCII is no
GB18030 pair), so such a file is reported rather than read as garbage.
"""

from __future__ import annotations

import codecs

NOT_TEXT = "not UTF-8 or GB18030 text (save it as UTF-8)"


def decode_text(data: bytes) -> str | None:
    """The text, or None when no encoding tried reads every byte."""
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding)
            except UnicodeDecodeError:
                return None
    for encoding in ("utf-8", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return None
