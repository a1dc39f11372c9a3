"""Fixtures for the studio's browser tests: a real `qlora-kit studio` process on a free port over an empty workspace,
and Debian's chromium driven by Playwright (no browser download). Without chromium or Playwright the tests skip,
saying which is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("QLORA_KIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
# The docs' pictures (docs/images/studio-*.png) are retaken only when asked:
#   QLORA_KIT_SCREENSHOTS=docs/images python -m pytest tests/test_studio_browser.py
# Otherwise the same screenshots go to a temporary folder: the suite leaves the tree as it found it.
SCREENSHOTS = Path(os.environ.get("QLORA_KIT_SCREENSHOTS") or tempfile.mkdtemp(prefix="qlora_kit-screenshots-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    def __init__(self, root: Path, extra: list[str] = ()):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root.parent / f"studio-{self.port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlora_kit", "studio", "--no-browser", "--port",
                                          str(self.port), "--root", str(root), *extra], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        self.ready_after = self.wait()

    def wait(self, timeout: float = 90) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the studio exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return time.monotonic() - self.started
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the studio did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium): the studio's browser tests are skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[test]'): the studio's browser tests are skipped")
    import tempfile

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        # A persistent context is the way to give chromium a fresh user-data-dir of our own.
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=LAUNCH_ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


@pytest.fixture(scope="module")
def studio():
    # Not tmp_path_factory: pytest prunes old basetemp folders when any other pytest starts on this machine, and a
    # workspace must outlive the run in it.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="studio-workspace-") as folder:
        root = Path(folder) / "workspace"
        root.mkdir()
        server = Studio(root)
        yield server
        server.stop()


@pytest.fixture
def page(browser, studio):
    """A new tab on the studio; every request it makes is recorded (the page must stay on 127.0.0.1)."""
    tab = browser.new_page()
    tab.requests = []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.set_default_timeout(60_000)
    tab.goto(studio.url)
    tab.wait_for_selector("#preset")
    yield tab
    tab.close()


TEACHER_SERVER = Path(__file__).with_name("teacher_server.py")


class Teacher:
    """tests/teacher_server.py in MODE on a free port: a real OpenAI-compatible HTTP server of the tests' own."""

    model = "test-teacher"

    def __init__(self, mode: str, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests = folder / f"teacher-{mode}-{self.port}.jsonl"
        self.proc = subprocess.Popen([sys.executable, str(TEACHER_SERVER), str(self.port), mode, str(self.requests)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the test teacher did not start: {self.proc.stdout.read()}")

    def asked(self) -> list[dict]:
        """The requests it answered so far, one record each (kind, question, retry)."""
        import json

        if not self.requests.is_file():
            return []
        return [json.loads(line) for line in self.requests.read_text(encoding="utf-8").splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """start(mode) -> a running Teacher; all of them stopped after the module."""
    started = []
    folder = tmp_path_factory.mktemp("teacher")

    def start(mode: str = "good") -> Teacher:
        server = Teacher(mode, folder)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
