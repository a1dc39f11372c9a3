"""Base vs fine-tuned, side by side: two `qlora-kit chat RUN --prompt Q` children (one with --base), their output
read as it streams and shown with the reasoning folded."""

from __future__ import annotations

import codecs
import html
import os
import queue
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from qlora_kit.studio.runs import child_env, command

RULE = re.compile(r"^─+ (thinking|answer) ─+$", re.MULTILINE)
"""The rules `qlora-kit chat` prints (rich, off a terminal) between the reasoning and the answer."""


def split_reply(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a chat child's output so far."""
    parts = RULE.split(text)
    reasoning, answer, current = "", "", None
    for piece in parts[1:]:
        if piece in ("thinking", "answer"):
            current = piece
        elif current == "thinking":
            reasoning += piece
        elif current == "answer":
            answer += piece
    if parts and not reasoning and not answer:
        answer = parts[0]  # no reasoning block at all: everything printed is the answer
    return reasoning.strip("\n"), answer.strip("\n")


NOTE = re.compile(r"^\((no answer|cut at)[^\n]*\)$", re.MULTILINE)
"""The CLI's note under a reply that ran out of tokens."""


def reply_html(text: str, label: str, reasoning_label: str, done: bool) -> str:
    notes = [m.group(0) for m in NOTE.finditer(text)]
    reasoning, answer = split_reply(NOTE.sub("", text))
    if notes:
        answer = (answer + "\n" if answer else "") + " ".join(notes)
    fold = (f"<details class='chat-reasoning'><summary>{html.escape(reasoning_label)}</summary>"
            f"<pre style='white-space:pre-wrap'>{html.escape(reasoning)}</pre></details>") if reasoning else ""
    cursor = "" if done else " ▌"
    return (f"<div class='chat-reply' data-done='{str(done).lower()}'><h4>{html.escape(label)}</h4>{fold}"
            f"<div class='chat-answer' style='white-space:pre-wrap'>{html.escape(answer)}{cursor}</div></div>")


def _pump(stream, side: int, out: queue.Queue) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    while chunk := os.read(fd, 4096):  # whatever arrived, not whole lines: tokens show as they come
        out.put((side, decoder.decode(chunk)))
    out.put((side, None))


def ask_both(run_dir: Path, question: str, cwd: Path, max_new_tokens: int = 512) -> Iterator[tuple[str, str, int, int]]:
    """Yield (base output, fine-tuned output, base exit, tuned exit) as both stream; exits are -1 while running.
    The reply is the child's stdout; its stderr (what was loaded, or the error) is added only when it fails."""
    args = ["chat", str(run_dir), "--prompt", question, "--max-new-tokens", str(max_new_tokens), "--greedy"]
    procs = [subprocess.Popen(command(*args, *extra), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=child_env()) for extra in (["--base"], [])]
    out: queue.Queue = queue.Queue()
    errors: queue.Queue = queue.Queue()
    for side, proc in enumerate(procs):
        threading.Thread(target=_pump, args=(proc.stdout, side, out), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, side, errors), daemon=True).start()
    texts, open_sides = ["", ""], {0, 1}
    while open_sides:
        side, piece = out.get()
        if piece is None:
            open_sides.discard(side)
        else:
            texts[side] += piece
        while not out.empty():  # drain what else came, then one update for the page
            side, piece = out.get()
            if piece is None:
                open_sides.discard(side)
            else:
                texts[side] += piece
        codes = [p.poll() if s not in open_sides else -1 for s, p in enumerate(procs)]
        yield texts[0], texts[1], *(c if c is not None else -1 for c in codes)
    codes = [p.wait() for p in procs]
    stderr = ["", ""]
    while not errors.empty():
        side, piece = errors.get()
        stderr[side] += piece or ""
    texts = [text + (stderr[side] if codes[side] else "") for side, text in enumerate(texts)]
    yield texts[0], texts[1], codes[0], codes[1]
