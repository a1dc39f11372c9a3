"""Child processes and run directories: the studio's only way to act.

A training is `python -m qlora_kit run RECIPE` started in its own session (closing the tab, or even the studio, does not
stop it), its output appended to RUN_DIR/studio.log and its process id kept in RUN_DIR/studio.pid, so a reopened page,
or a restarted studio, finds it again. Stop sends SIGINT: the CLI's Ctrl-C path, which finishes the step and saves a
checkpoint. Resume runs the same command again (the CLI resumes from the newest checkpoint by itself). A make-data
job is followed the same way, through its NAME.job/ folder (its Ctrl-C keeps what was kept; the same command goes on).

Shorter jobs (the dry run, eval, merge, export, chat) stream their output back to the page line by line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR
from qlora_kit.recipe.run_files import CHECKPOINT_DIR, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE

LOG_FILE, PID_FILE, EXIT_FILE = "studio.log", "studio.pid", "studio.exit"
"""What the studio adds to a run directory: the child's output, its process id, its exit status."""

_children: dict[str, subprocess.Popen] = {}
"""Trainings this studio process started, by run directory: polled so that they are reaped, and their status known."""


def command(*args: str) -> list[str]:
    """`qlora-kit ARGS` as a child process: this Python, so the studio and its children share one environment."""
    return [sys.executable, "-m", "qlora_kit", *args]


def child_env(secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The studio's environment for a child, plus `secrets` (an API key typed into the page): the environment is
    the only place they go, never an argument (which `ps` shows), a file or a log."""
    # Unbuffered, so the page sees each line as it is printed; a wide console, so rich does not wrap the log.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "PYTHONIOENCODING": "utf-8", **(secrets or {})}


def start_run(run_dir: Path, recipe_path: Path, cwd: Path, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start (or resume: same command) a training of `recipe_path` whose output.dir is `run_dir`."""
    return start_job(run_dir, ("run", str(recipe_path), *overrides), cwd)


def start_job(folder: Path, args: tuple[str, ...], cwd: Path, secrets: dict[str, str] | None = None
              ) -> subprocess.Popen:
    """`qlora-kit ARGS` in its own session, followed through `folder`: its output appended to LOG_FILE, its process
    id in PID_FILE while it runs, its exit status in EXIT_FILE (a training's run directory, a make-data job's
    folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXIT_FILE).unlink(missing_ok=True)
    with (folder / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(f"\n$ qlora-kit {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(command(*args), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(secrets), start_new_session=True)
    (folder / PID_FILE).write_text(str(proc.pid), encoding="utf-8")
    _children[str(folder)] = proc
    threading.Thread(target=_record_exit, args=(proc, folder), daemon=True).start()
    return proc


def _record_exit(proc: subprocess.Popen, run_dir: Path) -> None:
    code = proc.wait()
    (run_dir / EXIT_FILE).write_text(str(code), encoding="utf-8")
    (run_dir / PID_FILE).unlink(missing_ok=True)


def running_pid(run_dir: Path) -> int | None:
    """The training child's process id while it runs (started by this studio or an earlier one), else None."""
    proc = _children.get(str(run_dir))
    if proc is not None:
        return proc.pid if proc.poll() is None else None
    try:
        pid = int((run_dir / PID_FILE).read_text(encoding="utf-8"))
        # Only a qlora_kit process: a pid left behind by a studio that died may have been reused by anything.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path("/proc").is_dir() else b"qlora_kit"
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if b"qlora_kit" in cmdline else None


def make_data_writing(out: Path) -> list[int]:
    """Process ids of `make-data` jobs (not dry runs) writing `out`, whoever started them: what the studio checks
    before a review rewrites their files. Read from /proc (each one's command line and folder); empty elsewhere."""
    found = []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else ():
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
            if not any(a in ("make-data", "qlora_kit.make_data") for a in argv) or "--dry-run" in argv:
                continue
            named = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"),
                         next((a.removeprefix("--out=") for a in argv if a.startswith("--out=")), ""))
            if named and (Path(os.readlink(entry / "cwd")) / named).resolve() == out.resolve():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def stop_run(run_dir: Path) -> bool:
    """SIGINT to the training: the CLI finishes the step, saves a checkpoint and exits 130. False if none runs."""
    pid = running_pid(run_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGINT)
    return True


def wait_for(run_dir: Path, timeout: float) -> int | None:
    """The exit status of a studio-started training, waiting up to `timeout` seconds (None if it still runs)."""
    proc = _children.get(str(run_dir))
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@dataclass
class RunState:
    status: str
    """new, running, stopped, finished or failed."""
    exit_code: int | None = None
    records: list[dict] | None = None


def exit_code(run_dir: Path) -> int | None:
    try:
        return int((run_dir / EXIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / CHECKPOINT_DIR).glob("checkpoint-*"))


def run_status(run_dir: Path) -> RunState:
    code = exit_code(run_dir)
    if running_pid(run_dir) is not None:
        return RunState("running")
    if (run_dir / SUMMARY_FILE).is_file() and code in (None, 0):
        return RunState("finished", code)
    if code not in (None, 0, EXIT_INTERRUPTED):
        return RunState("failed", code)
    if has_checkpoint(run_dir) or code == EXIT_INTERRUPTED:
        return RunState("stopped", code)
    return RunState("new", code)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as far as it is written (a line being written is skipped until complete)."""
    path = run_dir / METRICS_FILE
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def log_tail(run_dir: Path, lines: int = 20) -> str:
    try:
        with (run_dir / LOG_FILE).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 16384, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def list_runs(runs_dir: Path) -> list[str]:
    """Run directories under the workspace's runs/ (newest first): anything with a recipe or metrics, the CLI's
    runs included."""
    if not runs_dir.is_dir():
        return []
    marks = (RECIPE_FILE, METRICS_FILE, LOG_FILE)
    found = [p for p in runs_dir.iterdir() if p.is_dir() and any((p / name).is_file() for name in marks)]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def stream(argv: list[str], cwd: Path, log_path: Path | None = None) -> Iterator[tuple[str, int | None]]:
    """Run a job, yielding (output so far, None) as lines arrive, then (output, exit status)."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env())
    text = ""
    last = 0.0
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        text += raw.decode("utf-8", errors="replace")
        if time.monotonic() - last > 0.3:  # the page needs a few updates a second, not one per line
            last = time.monotonic()
            yield text, None
    code = proc.wait()
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(text, encoding="utf-8")
    yield text, code


def cli_error(output: str) -> str:
    """The one-screen error a qlora-kit command printed before exiting (`error: ...` to the end), or ""."""
    lines = output.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return ""
    return "\n".join([lines[starts[-1]].removeprefix("error: "), *lines[starts[-1] + 1:]]).strip()


def failure_text(output: str, code: int, what: str) -> str:
    """A failed child's last lines and the way on, as the page shows it."""
    tail = "\n".join(output.rstrip().splitlines()[-15:])
    why = ("the input needs a fix (above)" if code == EXIT_USER_ERROR
           else "it was stopped" if code == EXIT_INTERRUPTED
           else f"it exited with status {code}")
    return f"{what} did not finish: {why}.\n\n{tail}"
