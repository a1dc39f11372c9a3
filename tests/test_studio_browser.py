# ruff: noqa: F811 (the fixtures imported from studio_fixtures are parameters of the tests below)
"""The studio in a real browser (Debian's chromium through Playwright), against a real `qlora-kit studio` process
over an empty workspace: the demo from the first click to the downloaded GGUF, the error cases, the language switch.
Every assertion reads what the page shows after a click. Screenshots of each screen go to a temporary folder, or
to docs/images/studio-*.png when asked (QLORA_KIT_SCREENSHOTS=docs/images; studio_fixtures.py).
No network: the demo model and rows ship inside the package, and every request the page makes must stay local."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from studio_fixtures import SCREENSHOTS, Studio, browser, page, studio  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=False).first.click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=re.compile(name)).click()


def wait_text(page, selector: str, pattern: str, timeout: float = 120) -> str:
    """Poll an element's text until it matches `pattern`; fail with what it showed instead."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        loc = page.locator(selector)
        if loc.count():
            boxes = loc.first.locator("textarea")  # a Textbox's value is not part of its inner text
            text = boxes.first.input_value() if boxes.count() else loc.first.inner_text()
            if re.search(pattern, text):
                return text
        time.sleep(0.25)
    raise AssertionError(f"{selector} never matched {pattern!r}; it showed:\n{text}")


def shoot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"studio-{name}.png"), full_page=False)


def points_logged(text: str) -> int:
    found = re.search(r"(\d+) points logged", text)
    return int(found.group(1)) if found else 0


def only_local(requests) -> list[str]:
    return [url for url in requests if not url.startswith(("http://127.0.0.1", "data:", "blob:"))]


def test_the_demo_from_an_empty_workspace_to_a_downloaded_gguf(page, studio, tmp_path):
    # ---- model and data: the demo preset, the dry run's highlighted preview and its length report
    choose(page, "preset", "demo")
    page.wait_for_function("document.querySelector('#key-model-name input').value.includes('tiny-qwen2')")
    assert page.locator("#key-data-source textarea, #key-data-source input").first.input_value().endswith(
        "data.jsonl")
    page.locator("#preview-btn").click()
    page.wait_for_selector("#preview .preview-row", timeout=120_000)
    assert page.locator("#preview .preview-row").count() == 3
    assert page.locator("#preview .tok-trained").count() >= 3 and page.locator("#preview .tok-prompt").count() >= 3
    assert "<think>" in page.locator("#preview .tok-trained").first.inner_text() + \
        page.locator("#preview .tok-prompt").first.inner_text()
    log = page.locator("#preview-log textarea").input_value()
    assert "all rows fit max_length = 256" in log
    shoot(page, "data")

    # ---- settings and fit: the gauge follows max_length / r / the card; the TOML follows the form
    tab(page, "Settings")
    gauge = wait_text(page, "#fit", r"fits")
    assert "8 GiB card" in gauge
    set_number(page, "key-train-max_steps", 700)
    set_number(page, "key-lora-r", 8)
    wait_text(page, "#toml", r"max_steps = 700")
    choose(page, "card", "6 GB")
    wait_text(page, "#fit", r"6 GiB card")
    toml = page.locator("#toml textarea").input_value()
    assert "r = 8" in toml and 'init = "random"' in toml
    shoot(page, "settings")

    # ---- train: start, watch the loss chart gain points, stop (SIGINT, checkpoint), reopen, resume, finish
    tab(page, "Train")
    page.locator("#start").click()
    wait_text(page, "#status", r"running .* [2-9]\d* points logged|running .*\d\d+ points logged", 120)
    # Closing the tab does not stop the run: a reopened page follows it by itself.
    page.reload()
    page.wait_for_selector("#preset")
    tab(page, "Train")
    first = wait_text(page, "#status", r"demo.*running .* \d+ points logged", 60)
    # The charts follow: the loss chart's line gains points as the run logs them, and memory is drawn too.
    page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points) >= 2", timeout=30_000)
    drawn = int(page.locator("#loss-chart").get_attribute("data-points"))
    later = wait_text(page, "#status", rf"({'|'.join(str(n) for n in range(points_logged(first) + 1, 400))}) "
                                       r"points logged", 60)
    assert points_logged(later) > points_logged(first)
    page.wait_for_function(f"Number(document.querySelector('#loss-chart').dataset.points) > {drawn}", timeout=30_000)
    assert page.locator("#loss-chart polyline[data-series='train']").count() == 1
    assert int(page.locator("#memory-chart").get_attribute("data-points")) >= 2
    shoot(page, "train")
    page.locator("#stop").click()
    stopped = wait_text(page, "#status", r"stopped", 120)
    wait_text(page, "#log", r"stopped by SIGINT")
    step_at_stop = int(re.search(r"step (\d+)", stopped).group(1))
    assert 0 < step_at_stop < 700

    # Closing the tab does not lose the run: a new tab lists it and re-attaches.
    page.reload()
    page.wait_for_selector("#preset")
    tab(page, "Train")
    choose(page, "run-dir", "demo")
    wait_text(page, "#status", rf"stopped .*step {step_at_stop}")
    page.locator("#resume").click()
    wait_text(page, "#log", rf"resuming\s+from step {step_at_stop}", 120)
    wait_text(page, "#status", r"finished · step 700", 240)

    # ---- results: eval loss before -> after, format compliance, samples
    tab(page, "Results")
    summary = wait_text(page, "#results-summary", r"eval loss 16-bit base [\d.]+ → [\d.]+")
    before, after = map(float, re.search(r"eval loss 16-bit base ([\d.]+) → ([\d.]+)", summary).groups())
    assert after < before and "NF4 base (the 4-bit model training starts from)" in summary
    assert "format compliance" in summary
    wait_text(page, "#samples", r"\S")
    shoot(page, "results")
    # The multiple-choice evaluation: a questions file in the workspace, base vs fine-tuned, as a table.
    questions = studio.root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Which letter is number {i + 1}?",
                                             "options": ["one", "two", "three", "four"], "answer": "ABCD"[i]}) + "\n"
                                 for i in range(4)), encoding="utf-8")
    page.locator("#eval-file textarea, #eval-file input").first.fill(str(questions))
    page.locator("#eval-btn").click()
    table = wait_text(page, "#eval-table", r"fine-tuned[\s\S]*questions[\s\S]*/4", 240)
    assert "base" in table and "%" in table
    shoot(page, "eval")

    # ---- chat: base and fine-tuned answer the same question, side by side
    tab(page, "Chat")
    page.locator("#question textarea").fill("A patient's blood pressure is 107/71 mmHg. How is it classified?")
    set_number(page, "max-new-tokens", 48)
    page.locator("#ask").click()
    page.wait_for_selector("#reply-base .chat-reply[data-done='true']", timeout=180_000)
    page.wait_for_selector("#reply-tuned .chat-reply[data-done='true']", timeout=180_000)
    assert "Base" in page.locator("#reply-base").inner_text()
    assert "Fine-tuned" in page.locator("#reply-tuned").inner_text()
    shoot(page, "chat")

    # ---- export: merge, then q8_0 and q4_k_m GGUF with the advice for the card; download the files
    tab(page, "Export")
    wait_text(page, "#gguf-advice", r"q8_0|merged|GGUF")
    page.locator("#export-btn").click()
    wait_text(page, "#export-log", r"done\.", 300)
    link = page.locator("#export-files a[download$='q8_0.gguf']").first
    assert page.locator("#export-files a[download$='.Modelfile']").count() == 1
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "model.gguf"
    download.value.save_as(saved)
    assert saved.read_bytes()[:4] == b"GGUF"
    # The K-quant the advice names for most cards: the merged folder is reused, only the export runs again.
    choose(page, "gguf-type", "q4_k_m")
    page.locator("#export-btn").click()
    log = wait_text(page, "#export-log", r"--type q4_k_m[\s\S]*done\.", 300)
    assert "qlora-kit merge" not in log
    with page.expect_download() as download:
        page.locator("#export-files a[download$='q4_k_m.gguf']").first.click()
    saved = tmp_path / "model-q4_k_m.gguf"
    download.value.save_as(saved)
    assert saved.read_bytes()[:4] == b"GGUF"
    # Served from the run directory, not copied into Gradio's cache (a real model's GGUF is gigabytes).
    assert not list((studio.root / ".studio").rglob("*.gguf"))
    shoot(page, "export")

    assert only_local(page.requests) == [], "the page reached beyond 127.0.0.1"


def test_the_dpo_demo_pairs_fit_rewards_and_judgement(page, studio):
    # ---- model and data: the pairs as the trainer sees them, prompt dim, chosen green, rejected red
    choose(page, "preset", "demo DPO")
    page.wait_for_function("document.querySelector('#key-data-source textarea, #key-data-source input')"
                           ".value.endsWith('pairs.jsonl')")
    page.locator("#preview-btn").click()
    page.wait_for_selector("#preview .pair-row", timeout=120_000)
    assert page.locator("#preview .pair-row").count() == 3
    chosen = page.locator("#preview .tok-chosen").first.inner_text()
    rejected = page.locator("#preview .tok-rejected").first.inner_text()
    prompt = page.locator("#preview .tok-prompt").first.inner_text()
    # rendered as SFT renders a completion: the template's one <think> ends the prompt, the sides close it
    assert prompt.rstrip().endswith("<think>") and "<think>" not in chosen + rejected
    assert "</think>" in chosen and len(chosen) > len(rejected)
    assert page.locator("#preview .tok-prompt").count() == 6  # each pair's prompt before both of its sides
    assert re.search(r"row \d+: prompt \d+ tokens", page.locator("#preview .pair-row").first.inner_text())
    shoot(page, "dpo-data")

    # ---- settings: the method up front, [pref] among the advanced keys, the planner's gauge for a DPO run
    tab(page, "Settings")
    assert page.locator("#key-train-method input").input_value() == "dpo"
    wait_text(page, "#fit", r"fits")
    toml = wait_text(page, "#toml", r'method = "dpo"')
    assert "[pref]" in toml or "beta" not in toml  # beta 0.1 is the default: the TOML holds only what differs
    page.locator("#advanced .label-wrap").first.click()  # the [pref] section, generated from the dataclasses
    page.wait_for_selector("#key-pref-beta input", timeout=10_000)
    assert float(page.locator("#key-pref-beta input").input_value()) == 0.1

    # ---- train: the live rewards and accuracy charts follow TRL's rewards/* as the run logs them
    tab(page, "Train")
    page.locator("#start").click()
    wait_text(page, "#status", r"demo_dpo.*finished · step 30", 300)
    page.wait_for_function("Number(document.querySelector('#rewards-chart').dataset.points) >= 6", timeout=30_000)
    for series in ("chosen", "rejected", "margin"):
        assert page.locator(f"#rewards-chart polyline[data-series='{series}']").count() == 1
    assert int(page.locator("#accuracy-chart").get_attribute("data-points")) >= 2
    shoot(page, "dpo-train")

    # ---- results: the before -> after judgement on held-out pairs and the reward curve
    tab(page, "Results")
    summary = wait_text(page, "#results-summary", r"prefers chosen")
    before, after = map(int, re.search(r"prefers chosen \(log-probability per token\): (\d+)% before -> (\d+)% "
                                       r"after", summary).groups())
    assert after > before and "DPO judged on 16 held-out rows" in summary
    page.wait_for_selector("#reward-curve img", timeout=30_000)
    wait_text(page, "#samples", r"\S")
    shoot(page, "dpo-results")

    # ---- a page opened later starts on the newest run, on every screen that needs one
    page.reload()
    page.wait_for_selector("#preset")
    tab(page, "Export")
    advice = wait_text(page, "#gguf-advice", r"q4_k_m|GGUF", 60)
    assert "No run chosen" not in advice
    tab(page, "Results")
    wait_text(page, "#results-summary", r"prefers chosen", 60)


def field_error(page, elem_id: str, pattern: str, timeout: float = 120) -> str:
    """The message Gradio shows under a field (its validation message), once it matches `pattern`."""
    return wait_text(page, f"#{elem_id} .validation-error:not(:empty)", pattern, timeout)


def marked(page) -> list[str]:
    """The fields showing an error message, by element id."""
    return page.evaluate("[...document.querySelectorAll('.validation-error')].filter(e => e.textContent.trim())"
                         ".map(e => e.closest('[id]').id)")


def test_error_cases_show_the_clis_message_under_the_field(page, studio):
    # A bad data row: the dry run's message, with the line number, under the data field; no traceback.
    bad = studio.root / "data" / "bad.jsonl"
    bad.parent.mkdir(exist_ok=True)
    good = '{"Question": "q%d", "Complex_CoT": "c", "Response": "r"}\n'
    bad.write_text("".join(good % i for i in range(5)) + '{"Question": "q", "Complex_CoT": \n', encoding="utf-8")
    choose(page, "preset", "demo")
    page.wait_for_function("document.querySelector('#key-model-name input').value.includes('tiny-qwen2')")
    page.locator("#key-data-source textarea, #key-data-source input").first.fill("data/bad.jsonl")
    page.locator("#preview-btn").click()
    text = field_error(page, "key-data-source", r"bad\.jsonl, line 6")
    assert "not valid JSON" in text and "Traceback" not in text
    assert marked(page) == ["key-data-source"]

    # A mistyped file name: the file meant, under the data field (not a hub lookup of "data/bad.jsnl").
    page.locator("#key-data-source textarea, #key-data-source input").first.fill("data/bad.jsnl")
    page.locator("#preview-btn").click()
    field_error(page, "key-data-source", r"Data file not found: .*bad\.jsnl \(did you mean `.*data/bad\.jsonl`\?\)")

    # A path outside the workspace: refused under the field before anything runs.
    page.locator("#key-data-source textarea, #key-data-source input").first.fill("../../etc/passwd.jsonl")
    page.locator("#preview-btn").click()
    field_error(page, "key-data-source", r"outside the studio's workspace")

    # A typo'd hub id (offline here): the CLI's one-screen message under the model field. With rows that are
    # fine: a local data file is checked first, before the model (in a second, before the libraries load).
    fine = studio.root / "data" / "fine.jsonl"
    fine.write_text("".join(good % i for i in range(5)), encoding="utf-8")
    page.locator("#key-data-source textarea, #key-data-source input").first.fill(str(fine))
    model = page.locator("#key-model-name input")
    model.fill("deepseek-ai/DeepSeek-R1-Distil-Qwen-1.5B")
    model.press("Enter")
    page.locator("#preview-btn").click()
    text = field_error(page, "key-model-name", r"DeepSeek-R1-Distil-Qwen-1\.5B")
    assert "Traceback" not in text
    assert marked(page) == ["key-model-name"]
    shoot(page, "error")

    # A plan that does not fit: the gauge says so, with the planner's advice.
    choose(page, "preset", "demo")
    page.wait_for_function("document.querySelector('#key-data-source textarea, #key-data-source input')"
                           ".value.endsWith('data.jsonl')")
    page.locator("#key-model-name input").fill("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    page.locator("#key-model-name input").press("Enter")
    tab(page, "Settings")
    set_number(page, "key-data-max_length", 8192)
    # The card's gauge (on this GPU-less machine it stands under the CPU's own RAM plan, which says its own verdict).
    text = wait_text(page, "#fit-gauge", r"does not fit.*8192 tokens", 60)
    assert "Try:" in text

    # A value the recipe refuses: the loader's message under that key, gone once the value is fixed.
    set_number(page, "key-lora-r", 0)
    text = field_error(page, "key-lora-r", r"lora\.r", 30)
    assert marked(page) == ["key-lora-r"], "only the refused key is marked"
    shoot(page, "field-error")
    set_number(page, "key-lora-r", 8)
    page.wait_for_function("![...document.querySelectorAll('.validation-error')].some(e => e.textContent.trim())",
                           timeout=30_000)
    # A refused value on the Settings screen is pointed at from the Train screen's Start.
    set_number(page, "key-train-batch_size", 0)
    field_error(page, "key-train-batch_size", r"train\.batch_size", 30)
    tab(page, "Train")
    runs_before = sorted((studio.root / "runs").glob("*"))
    page.locator("#start").click()
    wait_text(page, "#train-error", r"train\.batch_size.*Settings", 30)
    assert sorted((studio.root / "runs").glob("*")) == runs_before, "nothing started"
    assert only_local(page.requests) == []


def test_language_switch(page):
    page.get_by_text("中文").click()
    page.get_by_role("tab", name="1 · 模型与数据").wait_for()
    assert page.get_by_role("tab").all_inner_texts()[3] == "3 · 训练"
    wait_text(page, "#intro", "一步一屏")
    assert page.locator("#preview-btn").inner_text() == "检查数据（试运行）"
    assert "模型" in page.locator("#key-model-name").inner_text()
    shoot(page, "chinese")
    page.get_by_text("English").click()
    page.get_by_role("tab", name="1 · Model & data").wait_for()
    assert page.locator("#preview-btn").inner_text() == "Check the data (dry run)"


def test_auth_asks_for_the_login_first(browser, tmp_path):
    server = Studio(tmp_path, ["--auth", "me:a-long-secret"])
    try:
        tab = browser.new_page()
        tab.set_default_timeout(60_000)
        tab.goto(server.url)
        tab.locator("input[type=password]").wait_for()
        assert tab.locator("#preset").count() == 0  # nothing of the studio before the login
        tab.locator("input[type=text]").first.fill("me")
        tab.locator("input[type=password]").fill("wrong")
        tab.get_by_role("button", name="Login").click()
        tab.get_by_text("Incorrect").first.wait_for()
        tab.locator("input[type=text]").first.fill("me")
        tab.locator("input[type=password]").fill("a-long-secret")
        tab.get_by_role("button", name="Login").click()
        tab.wait_for_selector("#preset")
        tab.close()
    finally:
        server.stop()


def test_an_open_host_without_auth_serves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="without a login"):
        Studio(tmp_path, ["--host", "0.0.0.0"])


def test_the_page_publishes_no_api_and_gradio_clients_cannot_call_its_events(studio):
    """The page calls its events itself; Gradio's description of them as a public API (290 KB of a 516 KB page,
    before keep_events_private) is gone, and Gradio's own client refuses them by name and by index."""
    from gradio_client import Client

    html = urllib.request.urlopen(studio.url, timeout=30).read().decode("utf-8")
    described = re.search(r"window\.gradio_api_info = (\{.*?\});</script>", html, re.S)
    assert described and json.loads(described.group(1)) == {"named_endpoints": {}, "unnamed_endpoints": {}}
    with urllib.request.urlopen(f"{studio.url}gradio_api/info", timeout=30) as answer:
        assert json.loads(answer.read()) == {"named_endpoints": {}, "unnamed_endpoints": {}}
    client = Client(studio.url, verbose=False)
    with pytest.raises(ValueError, match="Cannot find a function"):
        client.predict(api_name="/on_start")
    with pytest.raises(ValueError, match="Invalid function index"):
        client.predict(fn_index=0)
