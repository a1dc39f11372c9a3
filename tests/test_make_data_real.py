"""make-data against a real model on a real server: `transformers serve` (transformers' own OpenAI-compatible server)
with SmolLM2-135M-Instruct as the teacher. A 135M model follows the prompts poorly, so this asserts what must hold
whatever it writes: the job ends (never a traceback), every question it gave is decided (kept, or refused with a
reason), the counts add up, and every kept row is a row training reads. What it kept is docs/make-data.md's figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def served_smollm2(smollm2_dir):
    from test_make_data_job import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    entry = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    server = subprocess.Popen([sys.executable, "-c", entry, "serve", str(smollm2_dir),
                               "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                pytest.skip("transformers serve did not start (pip install 'transformers[serving]')")
            time.sleep(1)
    yield {"url": f"{url}/v1", "model": str(smollm2_dir)}
    server.kill()
    server.wait()


def test_smollm2_as_teacher_through_transformers_serve(served_smollm2, smollm2_dir, tmp_path):
    (tmp_path / "liver.md").write_text(
        "# Hepatitis B\n\nHepatitis B is an infection of the liver caused by the hepatitis B virus. It spreads through "
        "blood and body fluids, for example from mother to child at birth. A vaccine gives about 95 percent "
        "protection and is given to infants at birth.\n")
    out = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, "-m", "qlora_kit.make_data", str(tmp_path / "liver.md"), "--out", str(out),
                             "--base-url", served_smollm2["url"], "--model", served_smollm2["model"], "--tokenizer",
                             str(smollm2_dir), "--questions-per-chunk", "2", "--answer-tokens", "256",
                             "--eval-share", "0"], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "rows.job" / "summary.json").read_text())
    assert summary["failed_requests"] == {} and summary["chunks_not_asked"] == 0
    assert summary["questions_not_answered"] == 0  # every question the teacher gave was decided
    log = [json.loads(line) for line in (tmp_path / "rows.job" / "log.jsonl").read_text().splitlines()]
    asked = sum(len(entry["questions"]) for entry in log if "questions" in entry)
    decided = [entry for entry in log if "question" in entry]
    refused_chunks = sum("refused" in entry for entry in log)
    assert len(decided) == asked and sum(summary["refused"].values()) == (
        sum(not e["kept"] for e in decided) + refused_chunks)
    kept = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert len(kept) == summary["rows_train"] == sum(e["kept"] for e in decided)
    for row in kept:
        assert row["Question"] and row["Complex_CoT"] and row["Response"] and row["score"] >= 7
    print(json.dumps({"kept": len(kept), "refused": summary["refused"], "seconds": summary["seconds"]}))
