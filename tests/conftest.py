"""Shared fixtures: real tokenizers (the shipped demo one, the real R1-Distill one when present),
tiny real-architecture models, and recipe files written on the fly. Nothing here touches a network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = Path(os.environ.get("QLORA_KIT_FIXTURES", REPO.parent / "shared" / "fixtures"))
R1_TOKENIZER = SHARED_FIXTURES / "r1-distill-qwen-tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the network must fail, not hang
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: each worker (and the processes its tests start) gets its share of the cores, set before torch
    # loads; N workers each spinning on every core would be slower than one.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


@pytest.fixture(scope="session")
def demo_rows():
    from qlora_kit.demo.build import make_rows

    return make_rows()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_rows):
    """A byte-level BPE trained in the fixture, with R1's special tokens and an R1-like chat template."""
    from qlora_kit.demo.build import build_tokenizer

    texts = [r["Question"] + "\n" + r["Complex_CoT"] + "\n" + r["Response"] for r in demo_rows]
    return build_tokenizer(texts)


@pytest.fixture(scope="session")
def r1_tokenizer():
    """The real DeepSeek-R1-Distill-Qwen tokenizer and chat template (skipped where the fixture is absent)."""
    if not (R1_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real R1 tokenizer fixture not found at {R1_TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(R1_TOKENIZER)


def medical_rows_path(lang: str) -> Path:
    path = SHARED_FIXTURES / f"medical_o1_{lang}.jsonl"
    if not path.is_file():
        pytest.skip(f"real medical-o1 rows not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A config-only Qwen2 model folder (2 layers) with the demo tokenizer: init = "random" builds it."""
    from qlora_kit.demo.build import tiny_qwen2_config

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    config = tiny_qwen2_config(len(demo_tokenizer), bos_token_id=demo_tokenizer.bos_token_id,
                               eos_token_id=demo_tokenizer.eos_token_id, pad_token_id=demo_tokenizer.pad_token_id)
    config.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe file from TOML text and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `python -m qlora_kit.run ...` as a user would; returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora_kit.run", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def encode_for_training(recipe):
    """The run's own data steps for a recipe, in-process: (tokenizer, train rows, renderer, training examples)."""
    from qlora_kit.data.encode import Encoder, apply_length_policy, encode_rows
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import load_rows, split_rows
    from qlora_kit.model.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    train_rows, _ = split_rows(load_rows(recipe.data).rows, recipe.data, recipe.train.seed)
    renderer, _ = make_renderer(tokenizer, recipe.data)
    examples, _ = apply_length_policy(encode_rows(Encoder(tokenizer, renderer), train_rows),
                                      recipe.data.max_length, "drop")
    return tokenizer, train_rows, renderer, examples


@pytest.fixture(scope="session")
def calibrate():
    """tools/calibrate_plan.py as a module: real training steps on CPU with every live tensor counted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_plan", REPO / "tools" / "calibrate_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ a real model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's official Q4_1 GGUF (`python -m qlora_kit.smollm2` fetches it; .ci/run does)."""
    from qlora_kit.model.smollm2 import default_path, find

    path = find()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not found (offline?): `python -m qlora_kit.smollm2` puts it at {default_path()}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The 16-bit model folder qlora_kit makes from that GGUF (in its cache: made once, reused by later sessions)."""
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.recipe.schema import ModelSection

    model = ModelSection(name=str(smollm2_gguf.parent), gguf_file=str(smollm2_gguf))
    prepare_gguf_base(model, weights=True)
    return Path(model.name)


SMOL_STEPS, SMOL_BATCH, SMOL_QUESTIONS, SMOL_NEW_TOKENS = 16, 4, 3, 112


@pytest.fixture(scope="session")
def smol_run(smollm2_gguf, tmp_path_factory):
    """SmolLM2 fine-tuned for real by the command a user types (the demo rows, 16 steps): the run the real-weights
    tests judge (tests/test_real_model.py) and evaluate (tests/test_eval.py). Trained once per session."""
    import json

    out = tmp_path_factory.mktemp("smol") / "run"
    result = run_cli(str(REPO / "recipes" / "demo.toml"), f"model.name={smollm2_gguf}", "model.init=pretrained",
                     "data.max_length=256", "data.eval_rows=8", "data.system_prompt=Answer briefly.",
                     f"train.max_steps={SMOL_STEPS}", f"train.batch_size={SMOL_BATCH}", "train.learning_rate=3e-3",
                     "train.warmup=0.1", "train.eval_steps=0", "train.save_steps=0",
                     "train.gradient_checkpointing=false",
                     f"samples.count={SMOL_QUESTIONS}", "samples.greedy=true",
                     f"samples.max_new_tokens={SMOL_NEW_TOKENS}", f"output.dir={out}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": out, "stdout": result.stdout, "summary": json.loads((out / "summary.json").read_text())}


def pytest_collection_modifyitems(config, items):
    """Every real-weights test trains or loads a real model: it belongs to the slow tests too."""
    for item in items:
        if item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.slow)


TREE_BEFORE = pytest.StashKey[dict | None]()
"""What `git status` showed when the run started (the controlling process's)."""


def tree_state() -> dict[str, str] | None:
    """Every file `git status` lists (changed, added, untracked), with a hash of its content: a test that writes into
    the checkout shows up here, even in a file that was already changed before the run. None outside a git checkout."""
    import hashlib
    import subprocess

    try:
        listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "-z"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    state = {}
    for entry in filter(None, listed.split("\0")):
        path = REPO / entry[3:]
        state[entry[3:]] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else entry[:2]
    return state


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controlling process only (pytest-xdist's workers skip it)
        session.config.stash[TREE_BEFORE] = tree_state()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves the checkout as it found it: a test that writes into it (docs pictures, a run directory, a
    cache) fails the run, naming the files."""
    if hasattr(session.config, "workerinput"):
        return
    before = session.config.stash.get(TREE_BEFORE, None)
    after = tree_state()
    if before is None or after is None or before == after:
        return
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    session.config.get_terminal_writer().line(
        "FAILED: the tests changed the checkout (git status differs after the run): " + ", ".join(changed[:20]),
        red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

