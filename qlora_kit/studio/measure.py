"""`python -m qlora_kit.studio.measure`: the studio's three performance figures, as docs/studio.md reports them.

1. first page: seconds from `qlora-kit studio` to the page's first answer, and to the form drawn in chromium (median
   of three), beside the same two figures for Gradio's floor: a page of one dropdown;
2. chart latency: seconds from the CLI writing a metrics line to the loss chart drawing that step (the chart's
   data-last-step, read in the browser every 20 ms, against the file's growth read every 10 ms);
3. overhead: the demo's wall time from the CLI, from the page kept open on the Train screen (charts redrawing,
   chromium on the same cores), and from the page closed after Start, in turns (--repeat rounds, medians); each
   from the start to the exit status on disk, with the CPU seconds chromium and the studio spent meanwhile;
4. chromium's CPU in cores on a blank page and on the Train screen following a run: what the browser costs by
   itself, and what following a run adds.

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


def serve(command: list[str], port: int) -> tuple[subprocess.Popen, str, float]:
    """Start a web server and wait for its first HTTP 200: (process, url, the monotonic time it was started)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return proc, url, start
        except OSError:
            time.sleep(0.02)


def studio_command(root: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "qlora_kit", "studio", "--no-browser", "--port", str(port), "--root", str(root)]


def start_studio(root: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    return serve(studio_command(root, port), port)


def demo_steps(page, steps: int, out: str = "runs/demo") -> None:
    page.locator("#preset input").click()
    page.get_by_role("option", name=re.compile("demo")).first.click()
    page.get_by_role("tab", name=re.compile("Settings")).click()
    box = page.locator("#key-train-max_steps input")
    box.fill(str(steps))
    box.press("Tab")
    page.wait_for_function(f"document.querySelector('#toml textarea').value.includes('max_steps = {steps}')")
    box = page.locator("#key-output-dir textarea, #key-output-dir input").first
    box.fill(out)
    box.press("Tab")
    page.wait_for_function(f"document.querySelector('#toml textarea').value.includes('{out}')")
    page.get_by_role("tab", name=re.compile("Train")).click()


def cpu_seconds(processes, children: bool = True) -> float:
    """User + system CPU seconds of these processes (and their children), so far (0 for those gone)."""
    import psutil

    total = 0.0
    for proc in processes:
        try:
            for one in [proc, *(proc.children(recursive=True) if children else [])]:
                times = one.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def browser_processes():
    import psutil

    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(("chromium", "chrome"))]


def wait_exit(run: Path) -> None:
    while not (run / "studio.exit").is_file():
        time.sleep(0.02)


def page_run(browser, url: str, root: Path, name: str, steps: int, studio_pid: int, keep_open: bool) -> dict:
    """The demo started from the page; the page kept open on the Train screen (charts redrawing) or closed after
    Start. Wall time from the click to the child's exit status on disk, as for the CLI run."""
    import psutil

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#preset")
    demo_steps(page, steps, f"runs/{name}")
    run = root / "runs" / name
    metrics = run / "metrics.jsonl"
    written: dict[int, float] = {}
    shown: dict[int, float] = {}
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
    studio = [psutil.Process(studio_pid)]
    cpu_before = (cpu_seconds(browser_processes(), children=False), cpu_seconds(studio))
    began = time.monotonic()
    page.locator("#start").click()
    if keep_open:
        while not (run / "studio.exit").is_file():
            step = page.evaluate("(document.querySelector('#loss-chart') || {dataset: {}}).dataset.lastStep")
            if step:
                shown.setdefault(int(float(step)), time.monotonic())
            time.sleep(0.02)
    else:
        page.wait_for_function("document.querySelector('#status').innerText.includes('running')")
        page.close()
        wait_exit(run)
    wall = time.monotonic() - began
    done.set()
    cpu_after = (cpu_seconds(browser_processes(), children=False), cpu_seconds(studio))
    if keep_open:
        page.close()
    result = {"wall_s": round(wall, 2),
              "train_wall_s": json.loads((run / "summary.json").read_text())["wall_time_s"],
              "studio_cpu_s": round(cpu_after[1] - cpu_before[1], 2)}
    if keep_open:  # a closed tab's renderer is gone, and its CPU seconds with it
        result["browser_cpu_s"] = round(cpu_after[0] - cpu_before[0], 2)
    lags = sorted(shown[s] - written[s] for s in shown if s in written)
    if lags:
        result["chart_lag_s"] = {"median": round(lags[len(lags) // 2], 2), "max": round(lags[-1], 2),
                                 "steps_seen": len(lags)}
    return result


def cli_run(root: Path, name: str, steps: int) -> dict:
    """The same demo recipe as the page's, from the command line."""
    import tomli_w

    from qlora_kit.studio.app import demo_raw

    raw = demo_raw()
    raw["train"]["max_steps"] = steps
    recipe = root / "recipes" / "cli.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(tomli_w.dumps(raw), encoding="utf-8")
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "qlora_kit", "run", str(recipe), f"output.dir={root / 'runs' / name}"],
                   cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env={**os.environ, "COLUMNS": "120"})
    wall = time.monotonic() - began
    return {"wall_s": round(wall, 2),
            "train_wall_s": json.loads((root / "runs" / name / "summary.json").read_text())["wall_time_s"]}


GRADIO_FLOOR_APP = """
import os, sys
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr
with gr.Blocks(analytics_enabled=False) as page:
    gr.Dropdown(["a", "b"], elem_id="preset")
page.launch(server_port=int(sys.argv[1]), quiet=True, ssr_mode=False, pwa=False, enable_monitoring=False,
            mcp_server=False)
"""


def first_page(browser, command: list[str], port: int) -> tuple[float, float, dict]:
    """Seconds from starting `command` to its HTTP answer on `port`, and to #preset drawn in a tab; and what the
    page loaded before it was drawn: requests, bytes, the HTML document's bytes (it carries the page's config
    inline), the scripts and their bytes, and when the last script arrived (seconds after the page was asked)."""
    proc, url, start = serve(command, port)
    answered = time.monotonic() - start
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#preset")
    shown = time.monotonic() - start
    entries = page.evaluate("performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType, "
                            "e.responseEnd, e.encodedBodySize]).concat(performance.getEntriesByType('navigation')"
                            ".map(e => [e.name, 'document', e.responseEnd, e.encodedBodySize]))")
    page.close()
    proc.terminate()
    proc.wait()
    scripts = [e for e in entries if e[0].endswith(".js")]
    loaded = {"requests": len(entries), "bytes": sum(e[3] for e in entries),
              "document_bytes": sum(e[3] for e in entries if e[1] == "document"),
              "scripts": len(scripts), "script_bytes": sum(e[3] for e in scripts),
              "last_script_s": round(max((e[2] for e in scripts), default=0) / 1000, 2)}
    return round(answered, 2), round(shown, 2), loaded


def browser_cores(browser, url: str, root: Path, window_s: float = 12.0) -> dict:
    """Chromium's CPU, in cores, over `window_s`: on a blank page (the browser's own), and on the Train screen
    following a running demo (what the page adds while it follows a run)."""

    def cores() -> float:
        before = cpu_seconds(browser_processes(), children=False)
        time.sleep(window_s)
        return round((cpu_seconds(browser_processes(), children=False) - before) / window_s, 3)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto("about:blank")
    blank = cores()
    page.goto(url)
    page.wait_for_selector("#preset")
    demo_steps(page, 100_000, "runs/cores")
    page.locator("#start").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('loss')", timeout=300_000)
    following = cores()
    page.locator("#stop").click()
    wait_exit(root / "runs" / "cores")
    page.close()
    return {"blank_page": blank, "train_screen_following_a_run": following}


def median(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.studio.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--steps", type=int, default=200, help="demo steps for the latency and overhead runs")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of CLI / page open / tab closed (default 3)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    results: dict = {}
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as p:
        root = Path(folder)
        browser = p.chromium.launch(executable_path=args.chromium, args=LAUNCH_ARGS)
        # 1. First page, three times each: the studio, and Gradio's floor (a page of one dropdown).
        floor_app = root / "floor.py"
        floor_app.write_text(GRADIO_FLOOR_APP, encoding="utf-8")
        studio_times, floor_times = [], []
        for _ in range(3):
            port = free_port()
            studio_times.append(first_page(browser, studio_command(root, port), port))
            port = free_port()
            floor_times.append(first_page(browser, [sys.executable, str(floor_app), str(port)], port))
        results["first_answer_s"] = median([a for a, _, _ in studio_times])
        results["form_shown_s"] = median([s for _, s, _ in studio_times])
        results["first_page_loaded"] = studio_times[-1][2]
        results["gradio_floor"] = {"first_answer_s": median([a for a, _, _ in floor_times]),
                                   "shown_s": median([s for _, s, _ in floor_times]), "loaded": floor_times[-1][2]}
        results["first_page_rounds"] = {"studio": [t[:2] for t in studio_times],
                                        "floor": [t[:2] for t in floor_times]}

        # 2 and 3: the demo from the CLI, from the page kept open, and from the page closed after Start, in turns.
        proc, url, _ = start_studio(root)
        rounds = []
        for i in range(args.repeat):
            rounds.append({"cli": cli_run(root, f"cli{i}", args.steps),
                           "page_open": page_run(browser, url, root, f"open{i}", args.steps, proc.pid, True),
                           "tab_closed": page_run(browser, url, root, f"closed{i}", args.steps, proc.pid, False)})
        results["browser_cores"] = browser_cores(browser, url, root)
        proc.terminate()
        browser.close()
    results["rounds"] = rounds
    lags = [r["page_open"]["chart_lag_s"] for r in rounds if "chart_lag_s" in r["page_open"]]
    results["chart_lag_s"] = {"median": median([lag["median"] for lag in lags]),
                              "max": max(lag["max"] for lag in lags)} if lags else None
    results["median_wall_s"] = {way: median([r[way]["wall_s"] for r in rounds])
                                for way in ("cli", "page_open", "tab_closed")}
    # Each round's page run against the same round's CLI run (the machine drifts between rounds), then the median.
    results["overhead_percent"] = {way: median([(r[way]["wall_s"] / r["cli"]["wall_s"] - 1) * 100 for r in rounds])
                                   for way in ("page_open", "tab_closed")}
    results["browser_cpu_s_page_open"] = median([r["page_open"]["browser_cpu_s"] for r in rounds])
    results["studio_cpu_s_page_open"] = median([r["page_open"]["studio_cpu_s"] for r in rounds])
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
