"""`python -m qlora_kit.studio.measure`: the studio's three performance figures, as docs/studio.md reports them.

1. first page: seconds from `qlora-kit studio` to the page's first answer, and to the form shown in chromium;
2. chart latency: seconds from the CLI writing a metrics line to the page showing that step (every logged step of a
   demo run, measured in the browser against the file's growth);
3. overhead: the demo's wall time through the studio vs the same recipe from the CLI, run first: once with the page
   open on the Train screen (charts redrawing, chromium on the same cores), once with the tab closed after Start.

Needs chromium and Playwright (the test extra). Measurements, not tests: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(root: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit", "studio", "--no-browser", "--port", str(port),
                             "--root", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return proc, url, start
        except OSError:
            time.sleep(0.02)


def demo_steps(page, steps: int, out: str = "runs/demo") -> None:
    page.locator("#preset input").click()
    page.get_by_role("option", name=re.compile("demo")).first.click()
    page.get_by_role("tab", name=re.compile("Settings")).click()
    box = page.locator("#key-train-max_steps input")
    box.fill(str(steps))
    box.press("Tab")
    page.wait_for_function(f"document.querySelector('#toml').innerText.includes('max_steps = {steps}')")
    box = page.locator("#key-output-dir textarea, #key-output-dir input").first
    box.fill(out)
    box.press("Tab")
    page.wait_for_function(f"document.querySelector('#toml').innerText.includes('{out}')")
    page.get_by_role("tab", name=re.compile("Train")).click()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.studio.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--steps", type=int, default=200, help="demo steps for the latency and overhead runs")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    results = {}
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as p:
        root = Path(folder)
        browser = p.chromium.launch(executable_path=args.chromium, args=LAUNCH_ARGS)
        proc, url, start = start_studio(root)
        results["first_answer_s"] = round(time.monotonic() - start, 2)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#preset")
        results["form_shown_s"] = round(time.monotonic() - start, 2)

        # 2 and 3: a demo run from the page; metrics.jsonl's growth watched beside the page's step counter.
        demo_steps(page, args.steps)
        metrics = root / "runs" / "demo" / "metrics.jsonl"
        written: dict[int, float] = {}
        done = threading.Event()

        def watch():
            seen = 0
            while not done.is_set():
                try:
                    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                except (OSError, json.JSONDecodeError):
                    lines = []
                for record in lines[seen:]:
                    if "loss" in record:
                        written.setdefault(record["step"], time.monotonic())
                seen = len(lines)
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()
        began = time.monotonic()
        page.locator("#start").click()
        shown: dict[int, float] = {}
        while True:
            text = page.locator("#status").inner_text()
            step = re.search(r"step (\d+)", text)
            if step and "loss" in text:
                shown.setdefault(int(step.group(1)), time.monotonic())
            if "finished" in text:
                break
            time.sleep(0.02)
        studio_wall = time.monotonic() - began
        done.set()
        lags = sorted(shown[s] - written[s] for s in shown if s in written)
        results["chart_lag_s"] = {"median": round(lags[len(lags) // 2], 2), "max": round(lags[-1], 2),
                                  "steps_seen": len(lags)}
        summary = json.loads((root / "runs" / "demo" / "summary.json").read_text())
        results["studio_run"] = {"page_wall_s": round(studio_wall, 1), "train_wall_s": summary["wall_time_s"]}

        # The same recipe from the CLI, nothing else running.
        recipe = root / "recipes" / "demo.toml"
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "qlora_kit", "run", str(recipe), f"output.dir={root / 'runs' / 'cli'}"],
                       cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       env={**os.environ, "COLUMNS": "120"})
        cli_wall = time.monotonic() - began
        summary = json.loads((root / "runs" / "cli" / "summary.json").read_text())
        results["cli_run"] = {"command_wall_s": round(cli_wall, 1), "train_wall_s": summary["wall_time_s"]}

        # Started from the page, then the tab closed: the studio's own cost without a browser drawing charts.
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#preset")
        demo_steps(page, args.steps, "runs/closed")
        began = time.monotonic()
        page.locator("#start").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('running')")
        page.close()
        closed = root / "runs" / "closed"
        while not (closed / "studio.exit").is_file():
            time.sleep(0.05)
        closed_wall = time.monotonic() - began
        summary = json.loads((closed / "summary.json").read_text())
        results["studio_run_tab_closed"] = {"wall_s": round(closed_wall, 1), "train_wall_s": summary["wall_time_s"]}
        results["overhead_percent"] = {"page_open": round((studio_wall / cli_wall - 1) * 100, 1),
                                       "tab_closed": round((closed_wall / cli_wall - 1) * 100, 1)}
        proc.terminate()
        browser.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
