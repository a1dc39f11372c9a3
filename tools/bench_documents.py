"""Pages per second reading real PDFs: make-data's reader against PDFium's own CLI, on the same files, one run.

    python tools/bench_documents.py FOLDER [--out bench/results/documents_parse.json] [--compare]

FOLDER holds the documents (PDFs are timed; DOCX/HTML/Markdown/TXT files are read and counted too). Keep them out
of the repository: the benchmark names the files and their page counts, never their text. For each PDF it times
  ours   qlora_kit.make_data.documents.read_documents: text, geometry, headers/footers out, paragraphs joined;
  raw    pypdfium2 in this process, get_text_range per page: the library's floor, with nothing of ours;
  cli    `pypdfium2 extract-text FILE` (the library's own command line, a fresh process: import included);
  pdftotext  poppler's CLI, where it is installed (a common reference; GPL, not a candidate for the install).
--compare also runs every other candidate library that is importable here, each in its own process (its import
timed apart): pypdf, pdfminer.six, pdfplumber, PyMuPDF, pymupdf4llm, markitdown; with the Chinese characters each
read (U+4E00-U+9FFF), the simplest check that a CID font's text came out as Chinese.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {"pypdfium2": "pypdfium2", "pypdf": "pypdf", "pdfminer.six": "pdfminer.high_level",
              "pdfplumber": "pdfplumber", "pymupdf": "pymupdf", "pymupdf4llm": "pymupdf4llm",
              "markitdown": "markitdown"}


def extract(library: str, path: str) -> list[str]:
    """One page's text per entry (markitdown gives the whole file as one), the way each library is usually used."""
    if library == "pypdfium2":
        import pypdfium2

        document = pypdfium2.PdfDocument(path)
        pages = []
        for page in document:
            textpage = page.get_textpage()
            pages.append(textpage.get_text_range(0, textpage.count_chars()))
        return pages
    if library == "pypdf":
        import pypdf

        return [page.extract_text() for page in pypdf.PdfReader(path).pages]
    if library == "pdfminer.six":
        from pdfminer.high_level import extract_text

        return extract_text(path).split("\f")[:-1]
    if library == "pdfplumber":
        import pdfplumber

        with pdfplumber.open(path) as pdf:
            return [page.extract_text() or "" for page in pdf.pages]
    if library == "pymupdf":
        import pymupdf

        return [page.get_text() for page in pymupdf.open(path)]
    if library == "pymupdf4llm":
        import pymupdf4llm

        return [chunk["text"] for chunk in pymupdf4llm.to_markdown(path, page_chunks=True, show_progress=False)]
    if library == "markitdown":
        from markitdown import MarkItDown

        return [MarkItDown().convert(path).text_content]
    raise ValueError(library)


def one(library: str, path: str) -> None:
    """Child process: import, then extract, printing the times and what came out as one JSON line."""
    started = time.perf_counter()
    __import__(CANDIDATES[library])
    imported = time.perf_counter()
    pages = extract(library, path)
    done = time.perf_counter()
    text = "".join(pages)
    print(json.dumps({"import_s": round(imported - started, 3), "seconds": round(done - imported, 3),
                      "chars": len(text), "han": len(re.findall(r"[\u4e00-\u9fff]", text)),
                      # words still cut in two at a line end ("pack-\nages"): hyphenation not undone
                      "split_words": len(re.findall(r"[a-z]-\r?\n[a-z]", text))}))


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the CPU model; elsewhere platform does
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}


def rate(pages: int, seconds: float) -> float:
    return round(pages / seconds, 1) if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/documents_parse.json")
    parser.add_argument("--compare", action="store_true", help="also time the other candidate libraries")
    parser.add_argument("--note", default="", help="said in the JSON, e.g. that the machine was shared")
    parser.add_argument("--one", nargs=2, metavar=("LIBRARY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(*args.one)
        return 0
    if args.folder is None:
        parser.error("give the FOLDER of documents")

    import pypdfium2

    from qlora_kit.make_data.documents import Document, find_documents, read_documents

    paths = find_documents([args.folder])
    pdfs = [path for path in paths if path.suffix.lower() == ".pdf"]
    cli = shutil.which("pypdfium2") or str(Path(sys.executable).with_name("pypdfium2"))
    pdftotext = shutil.which("pdftotext")
    rows, others = [], []
    for path in pdfs:
        try:
            pages = len(pypdfium2.PdfDocument(path))
        except pypdfium2.PdfiumError as error:  # encrypted or damaged: nothing to time
            rows.append({"file": path.name, "error": str(error)})
            continue
        path.read_bytes()  # the file in the page cache before anything is timed, so the first in line pays no disk
        started = time.perf_counter()
        (document,) = read_documents([path])
        ours = time.perf_counter() - started
        text = "\n\n".join(page.text for page in getattr(document, "pages", ()))
        started = time.perf_counter()
        extract("pypdfium2", str(path))
        raw = time.perf_counter() - started
        row = {"file": path.name, "pages": pages, "bytes": path.stat().st_size,
               "pages_with_text": len(document.pages) if isinstance(document, Document) else 0,
               "ours_chars": len(text), "ours_han": len(re.findall(r"[\u4e00-\u9fff]", text)),
               "ours_split_words": len(re.findall(r"[a-z]-\n[a-z]", text)),
               "ours_s": round(ours, 3), "raw_s": round(raw, 3),
               "cli_s": round(timed([cli, "extract-text", str(path)]), 3)}
        if pdftotext:
            row["pdftotext_s"] = round(timed([pdftotext, "-enc", "UTF-8", str(path), os.devnull]), 3)
        if args.compare:
            row["candidates"] = {}
            for library in CANDIDATES:
                if version(library) is None:
                    continue
                result = subprocess.run([sys.executable, __file__, "--one", library, str(path)],
                                        capture_output=True, text=True, timeout=1800)
                if result.returncode != 0:
                    row["candidates"][library] = {"error": result.stderr.strip().splitlines()[-1][:200]}
                    continue
                found = json.loads(result.stdout.strip().splitlines()[-1])
                row["candidates"][library] = {**found, "pages_per_s": rate(pages, found["seconds"])}
        rows.append(row)
        print(json.dumps({key: value for key, value in row.items() if key != "candidates"}), flush=True)
    for path in paths:
        if path in pdfs:
            continue
        started = time.perf_counter()
        (document,) = read_documents([path])
        others.append({"file": path.name, "kind": getattr(document, "kind", None),
                       "seconds": round(time.perf_counter() - started, 3),
                       "chars": sum(len(page.text) for page in getattr(document, "pages", ())),
                       "skipped": getattr(document, "reason", None)})

    rows_timed = [row for row in rows if "error" not in row]
    total = sum(row["pages"] for row in rows_timed)
    totals = {name: {"seconds": round(sum(row[f"{name}_s"] for row in rows_timed), 3),
                     "pages_per_s": rate(total, sum(row[f"{name}_s"] for row in rows_timed))}
              for name in ("ours", "raw", "cli", "pdftotext")
              if rows_timed and all(f"{name}_s" in row for row in rows_timed)}
    result = {
        "what": "pages per second reading the text of real PDFs; one run per file (after reading its bytes once), "
                "wall-clock; *_s are seconds per file, candidates' seconds exclude their import (import_s)",
        "command": "python tools/bench_documents.py FOLDER" + (" --compare" if args.compare else ""),
        "note": args.note,
        "machine": machine(),
        "versions": {name: version(name) for name in ("pypdfium2", "python-docx", "lxml", *CANDIDATES)
                     if version(name)},
        "pdfium": getattr(pypdfium2, "PDFIUM_INFO", None) and str(pypdfium2.PDFIUM_INFO),
        "pdftotext": subprocess.run([pdftotext, "-v"], capture_output=True, text=True).stderr.splitlines()[0]
        if pdftotext else None,
        "pages": total, "totals": totals, "pdfs": rows, "other_documents": others,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
