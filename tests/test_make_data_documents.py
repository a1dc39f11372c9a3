"""Reading documents for make-data: every file is written here by a real writer (reportlab lays out the PDFs,
python-docx writes the DOCX, the rest are bytes in their real encodings) and read back through PDFium, python-docx
and lxml. The asserts are exact: page numbers, the header/footer/page-number lines gone, the body whole and in
order, headings as '#' lines, each skip's reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qlora_kit.errors import UserError
from qlora_kit.make_data.documents import Document, Skipped, find_documents, read_documents
from qlora_kit.make_data.page_cleanup import is_page_number, tidy
from qlora_kit.make_data.pdf_text import ENCRYPTED, NO_TEXT_LAYER

PUMP = [
    "Before any work on the pump, close both valves and open the drain so that no pressure is left in the casing. "
    "Wear gloves: the seal faces are sharp and the housing may still be hot from the last run of the day.",
    "Check the coupling for wear every three months. A worn coupling shows as a black dust under the guard and as "
    "a knocking sound at start-up; replace the rubber element before it breaks, as a broken one damages the shafts.",
    "The bearings are greased for life and need no service. If a bearing grows loud, the motor must be sent back "
    "to the maker; opening it voids the warranty and the bearing cannot be pressed in again without the right tool.",
    "Record every check in the logbook with the date, the hours on the counter and the name of the person who did "
    "it, so that the next shift knows what was done and what is due.",
]


def _words(text: str) -> str:
    return " ".join(text.split())


def _read(path: Path) -> Document | Skipped:
    (result,) = read_documents([path])
    return result


@pytest.fixture(scope="module")
def english_pdf(tmp_path_factory) -> Path:
    """Two A4 pages laid out by reportlab's platypus: a heading and four paragraphs that flow onto page 2, under a
    running header, above a footer and a "Page N of 2" number."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    path = tmp_path_factory.mktemp("pdf") / "pump-manual.pdf"
    styles = getSampleStyleSheet()
    body = styles["BodyText"].clone("body", fontSize=12, leading=15, spaceAfter=10)

    def furniture(canvas, document):
        canvas.setFont("Helvetica", 9)
        canvas.drawString(72, A4[1] - 40, "ACME PX-200 Pump - Service Manual")
        canvas.drawString(72, 40, "Confidential: for ACME service staff only")
        canvas.drawRightString(A4[0] - 72, 40, f"Page {document.page} of 2")

    # Wide margins so that the four paragraphs need two pages
    template = SimpleDocTemplate(str(path), pagesize=A4, leftMargin=150, rightMargin=150, topMargin=430,
                                 bottomMargin=120)
    story = [Paragraph("Pump maintenance", styles["Heading1"])]
    for text in PUMP:
        story += [Paragraph(text, body), Spacer(1, 6)]
    template.build(story, onFirstPage=furniture, onLaterPages=furniture)
    return path


def test_two_page_pdf_keeps_page_numbers_and_drops_header_footer_and_page_number(english_pdf):
    document = _read(english_pdf)
    assert isinstance(document, Document) and document.kind == "pdf"
    assert [page.number for page in document.pages] == [1, 2]
    text = "\n\n".join(page.text for page in document.pages)
    for furniture in ("ACME PX-200", "Service Manual", "Confidential", "Page 1", "Page 2", "of 2"):
        assert furniture not in text
    # Nothing else is lost or added, and the order is the document's
    assert _words(text) == _words(" ".join(["Pump maintenance", *PUMP]))
    # The heading is a paragraph of its own; the wrapped lines of a paragraph are one line again
    first = document.pages[0].text.split("\n\n")
    assert first[:3] == ["Pump maintenance", PUMP[0], PUMP[1]]
    assert document.pages[1].text.split("\n\n")[-1] == PUMP[3]


def _canvas_pdf(path: Path, pages: list[dict], font: str = "Helvetica") -> Path:
    """A PDF drawn line by line: each page a dict of header, footer and body lines [(x, y, text)]."""
    from reportlab.pdfgen import canvas

    if font != "Helvetica":
        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.cidfonts import UnicodeCIDFont

        pdfmetrics.registerFont(UnicodeCIDFont(font))  # a CID font built into reportlab: no font file needed
    pdf = canvas.Canvas(str(path), pagesize=(595, 842))
    for page in pages:
        pdf.setFont(font, 9)
        if page.get("header"):
            pdf.drawString(72, 800, page["header"])
        if page.get("footer"):
            pdf.drawCentredString(297, 40, page["footer"])
        pdf.setFont(font, 12)
        for x, y, text in page["body"]:
            pdf.drawString(x, y, text)
        pdf.showPage()
    pdf.save()
    return path


def test_chinese_pdf_joins_lines_without_spaces_and_drops_chinese_page_numbers(tmp_path):
    first = [(72, 700, "这是第一段中文文字，它被排成两行，因为一行放不下这么多的字，"), (72, 684, "第二行接着写完。"),
             (96, 660, "第二段从缩进开始，同样分成两行排版，这样就能检查段落之间"), (72, 644, "是否留有空行。")]
    second = [(96, 700, "第二页只有一段。")]
    pages = [{"header": "页眉：泵的使用手册", "footer": f"第 {n} 页", "body": body}
             for n, body in ((1, first), (2, second))]
    document = _read(_canvas_pdf(tmp_path / "手册.pdf", pages, font="STSong-Light"))
    assert [page.number for page in document.pages] == [1, 2]
    assert document.pages[0].text == (
        "这是第一段中文文字，它被排成两行，因为一行放不下这么多的字，第二行接着写完。\n\n"
        "第二段从缩进开始，同样分成两行排版，这样就能检查段落之间是否留有空行。")
    assert document.pages[1].text == "第二页只有一段。"


def test_header_carrying_the_printed_page_number_is_dropped_even_when_its_title_changes(tmp_path):
    # A book's header: the section title changes from page to page, the printed number (the PDF page + 6) is there
    titles = ["Pumps and seals", "Valves", "Pipes and fittings", "Gauges"]
    # Each body opens with a number too, one that is no page number: it stays
    bodies = ["3 bolts hold the cover.", "12 turns open the valve.", "2 pipes meet here.", "40 bar is the limit."]
    pages = [{"header": f"{title}   {index + 7}", "body": [(72, 700, body)]}
             for index, (title, body) in enumerate(zip(titles, bodies, strict=True))]
    document = _read(_canvas_pdf(tmp_path / "book.pdf", pages))
    assert [page.text for page in document.pages] == bodies


def test_hyphenated_line_end_joined_and_wrapped_lines_joined_with_a_space(tmp_path):
    body = [(72, 700, "The seal must be checked for leaks before the hyphen-"),
            (72, 686, "ation rules of the manual apply to any of the"), (72, 672, "words.")]
    document = _read(_canvas_pdf(tmp_path / "wrap.pdf", [{"body": body}]))
    assert document.pages[0].text == ("The seal must be checked for leaks before the hyphenation rules of the "
                                      "manual apply to any of the words.")


def test_page_number_shapes_and_ligatures():
    for line in ("3", "- 3 -", "— 12 —", "Page 3 of 10", "page 3", "3 / 10", "第 3 页", "第3页 共10页", "iv", "xii"):
        assert is_page_number(line), line
    for line in ("3 bolts", "Chapter 3", "1.", "civil", "iiii", "第三章"):
        assert not is_page_number(line), line
    assert tidy("the ﬁrst ofﬁce  and the ﬂow") == "the first office and the flow"


def test_encrypted_scanned_damaged_and_empty_pdfs_are_skipped_with_their_reason(tmp_path):
    from PIL import Image, ImageDraw
    from reportlab.lib import pdfencrypt
    from reportlab.pdfgen import canvas

    locked = canvas.Canvas(str(tmp_path / "locked.pdf"), encrypt=pdfencrypt.StandardEncryption("secret"))
    locked.drawString(72, 700, "Only with the password.")
    locked.showPage()
    locked.save()
    # An owner password alone (printing forbidden) leaves the text readable to everyone: it is read
    owner_only = canvas.Canvas(str(tmp_path / "no-print.pdf"),
                               encrypt=pdfencrypt.StandardEncryption("", ownerPassword="owner", canPrint=0))
    owner_only.drawString(72, 700, "Readable without a password.")
    owner_only.showPage()
    owner_only.save()
    # A "scan": the page is a picture of text, with no text layer
    picture = Image.new("RGB", (600, 200), "white")
    ImageDraw.Draw(picture).text((20, 80), "This text is only pixels.", fill="black")
    picture.save(tmp_path / "scan.png")
    scan = canvas.Canvas(str(tmp_path / "scan.pdf"))
    scan.drawImage(str(tmp_path / "scan.png"), 72, 500, width=450, height=150)
    scan.showPage()
    scan.save()
    (tmp_path / "broken.pdf").write_bytes(b"this is not a PDF, only named like one\n")
    (tmp_path / "empty.pdf").write_bytes(b"")

    results = {result.path.name: result for result in read_documents(find_documents([tmp_path]))}
    assert results["locked.pdf"] == Skipped(tmp_path / "locked.pdf", ENCRYPTED)
    assert ENCRYPTED.startswith("encrypted PDF")
    assert results["scan.pdf"] == Skipped(tmp_path / "scan.pdf", NO_TEXT_LAYER)
    assert NO_TEXT_LAYER == "scanned PDF: no text layer (run OCR first, e.g. ocrmypdf)"
    assert results["broken.pdf"].reason.startswith("not a readable PDF (")
    assert results["empty.pdf"] == Skipped(tmp_path / "empty.pdf", "empty file")
    assert results["no-print.pdf"].pages[0].text == "Readable without a password."
    assert results["scan.png"].reason.startswith("unsupported type .png (an image: OCR it into a PDF first")


def test_docx_headings_lists_and_tables_in_order_without_its_header_and_footer(tmp_path):
    import docx

    document = docx.Document()
    document.sections[0].header.paragraphs[0].text = "ACME running header"
    document.sections[0].footer.paragraphs[0].text = "ACME running footer"
    document.add_heading("Pump manual", level=0)
    document.add_paragraph("Read this before the first start.")
    document.add_heading("Safety", level=1)
    document.add_paragraph("Close both valves.", style="List Bullet")
    document.add_paragraph("Open the drain.", style="List Bullet")
    document.add_heading("Torques", level=2)
    table = document.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, [("Bolt", "Torque"), ("M8", "25 Nm")], strict=True):
        for cell, text in zip(row.cells, cells, strict=True):
            cell.text = text
    document.add_paragraph("泵的说明书也有中文版。")
    document.save(tmp_path / "manual.docx")

    result = _read(tmp_path / "manual.docx")
    assert result.kind == "docx" and [page.number for page in result.pages] == [None]
    assert result.pages[0].text == (
        "# Pump manual\n\nRead this before the first start.\n\n# Safety\n\n- Close both valves.\n- Open the drain."
        "\n\n## Torques\n\n| Bolt | Torque |\n| --- | --- |\n| M8 | 25 Nm |\n\n泵的说明书也有中文版。")
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    assert _read(tmp_path / "broken.docx").reason.startswith("not a readable DOCX (")


def test_html_keeps_the_content_and_drops_navigation_scripts_and_page_chrome(tmp_path):
    page = """<!DOCTYPE html><html><head><meta charset="gbk"><title>泵</title>
<style>body { color: red }</style><script>var tracking = "do not read me";</script></head>
<body><header><a href="/">ACME home</a></header>
<nav><ul><li>Products</li><li>Contact</li></ul></nav>
<div class="breadcrumb">Home / Manuals</div>
<div class="header"><p>Next: Valves, Previous: Safety</p></div><div class="toc"><ul><li>泵的保养</li></ul></div>
<article><h1>泵的保养</h1><p>每次检修之前，先关闭两个阀门，
然后打开排水口。</p>
<h2>Checks</h2><ul><li>Coupling: every <b>three</b> months</li><li><p>Bearings: never</p></li></ul>
<table><tr><th>Bolt</th><th>Torque</th></tr><tr><td>M8</td><td>25 Nm</td></tr></table>
<pre>torque --bolt M8
  --value 25</pre></article>
<aside>Related: valves</aside><footer>(c) ACME 2026</footer><script>alert("no")</script></body></html>"""
    (tmp_path / "pump.html").write_bytes(page.encode("gbk"))
    result = _read(tmp_path / "pump.html")
    assert result.kind == "html"
    assert result.pages[0].text == (
        "# 泵的保养\n\n每次检修之前，先关闭两个阀门，然后打开排水口。\n\n## Checks\n\n"
        "- Coupling: every three months\n- Bearings: never\n\n| Bolt | Torque |\n| M8 | 25 Nm |\n\n"
        "```\ntorque --bolt M8\n  --value 25\n```")


def test_markdown_and_text_files_in_their_encodings(tmp_path):
    (tmp_path / "notes.md").write_text(
        "---\ntitle: Pump notes\n---\nPump notes\n==========\n\nKeep the valves closed.\r\n\r\n\r\n\r\n"
        "Checks\n------\n\n- coupling\n- bearings\n", encoding="utf-8")
    assert _read(tmp_path / "notes.md").pages[0].text == (
        "# Pump notes\n\nKeep the valves closed.\n\n## Checks\n\n- coupling\n- bearings")
    # Notepad's "UTF-8 with BOM": the BOM is not text
    (tmp_path / "bom.txt").write_bytes("\ufeffValves first.\nThen the drain.".encode("utf-8"))
    assert _read(tmp_path / "bom.txt").pages[0] .text == "Valves first.\nThen the drain."
    # A Chinese Windows editor's default (GBK, read as its superset GB18030): not valid UTF-8, read all the same
    chinese = "先关闭阀门，再打开排水口。\n每三个月检查一次联轴器。"
    data = chinese.encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    (tmp_path / "说明.txt").write_bytes(data)
    result = _read(tmp_path / "说明.txt")
    assert (result.kind, result.pages[0].number, result.pages[0].text) == ("text", None, chinese)
    (tmp_path / "latin1.txt").write_bytes("Café crème à la carte.".encode("latin-1"))
    assert _read(tmp_path / "latin1.txt").reason == "not UTF-8 or GB18030 text (save it as UTF-8)"
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    assert _read(tmp_path / "blank.txt").reason == "empty file"


def test_find_documents_walks_folders_sorted_skips_hidden_and_names_a_missing_path(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b/z.md", "a.txt", ".hidden.md", ".git/config.md", "~$open.docx", "slides.pptx", "b/empty.txt"):
        (tmp_path / name).write_text("" if "empty" in name else "x", encoding="utf-8")
    paths = find_documents([tmp_path / "b", tmp_path, tmp_path / "a.txt"])
    assert [path.relative_to(tmp_path).as_posix() for path in paths] == ["a.txt", "b/empty.txt", "b/z.md",
                                                                         "slides.pptx"]
    results = read_documents(paths)
    assert not isinstance(results, list)  # a generator: a big folder streams
    assert [r.reason if isinstance(r, Skipped) else r.kind for r in results] == [
        "text", "empty file", "markdown",
        "unsupported type .pptx (save it as PDF; supported: .pdf, .docx, .md, .markdown, .txt, .text, .html, "
        ".htm, .xhtml)"]
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "missing.pdf"))):
        find_documents([tmp_path / "a.txt", tmp_path / "missing.pdf"])
