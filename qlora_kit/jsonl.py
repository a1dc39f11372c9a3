"""JSON-lines files written one record at a time by a process that may be killed: metrics.jsonl, make-data's rows
and log. A record is one line, appended and flushed at once; reading back leaves out a line cut short by a kill (no
newline, not JSON), and appending first ends such a line, so it never glues itself to the next record."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of the file, in order ([] when there is none)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class AppendOnly:
    """A JSON-lines file that is only ever appended to, one flushed line per record."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("ab") as f:
                f.write(b"\n")
        self.file = path.open("a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
