"""The results document: settings, device, versions, commands, trials; written whole after every trial."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

from qlora_kit.bench.setups import LIBRARIES, REPO, model_config, settings_of

SCHEMA = 1


def new_document(args, command: str) -> dict:
    return {"schema": SCHEMA, "tool": "tools/bench.py", "command": command, "timestamp": _now(),
            "settings": settings_of(args), "device": None, "versions": None, "host": host_info(),
            "git": git_revision(), "runs": [], "models": {}, "trials": [], "longest": [], "run_index": 0}


def load_resumed(path: Path, args) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA or doc.get("settings") != settings_of(args):
        raise SystemExit(f"--resume {path}: recorded with other settings ({doc.get('settings')}); "
                         f"this command has {settings_of(args)}")
    # Trials that were cut short (time, crash) run again; OOMs and successes are facts to keep.
    doc["trials"] = [r for r in doc["trials"] if r["status"] in ("ok", "oom")]
    return doc


def open_document(args, command: str) -> dict:
    """A new results document, or the resumed one, with this command added to its runs."""
    doc = load_resumed(Path(args.resume), args) if args.resume else new_document(args, command)
    doc["run_index"] = len(doc["runs"])
    doc["runs"].append({"command": command, "timestamp": _now(), "cwd": os.getcwd(), "wall_s": 0.0,
                        "stopped": None})
    for name in args.models:
        doc["models"][name] = {"config": model_config(name, args.smoke), "smoke": args.smoke}
    return doc




def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def host_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "hostname": platform.node()}


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
