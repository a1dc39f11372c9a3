"""Generation and the chat command for real: a demo run trained in the fixture (4-bit NF4 base + LoRA on the
CPU), loaded back as the run loaded it; a merged folder from `qlora_kit.merge`; prompts checked token for
token against what training saw; the think/answer split and its streaming twin."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from qlora_kit.chat.cli import ReplyPrinter, main
from qlora_kit.chat.generate import GenerationSettings, ThinkRouter, ask, prompt_format
from qlora_kit.chat.loading import load_run
from qlora_kit.data.encode import Encoder
from qlora_kit.data.render import PLAIN_TEMPLATE, make_renderer
from qlora_kit.data.replies import split_think, template_separator
from qlora_kit.data.rows import Row
from qlora_kit.recipe.schema import DataSection

DEMO = REPO / "recipes" / "demo.toml"
QUESTION = "Is 39.8 °C a fever?"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "run"
    result = run_cli(str(DEMO), "train.max_steps=30", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def loaded(demo_run):
    return load_run(demo_run)


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "qlora_kit.chat", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------ the command


def test_one_shot_prompt_on_a_run(demo_run):
    result = run_chat(str(demo_run), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "thinking" in result.stdout and len(result.stdout.strip()) > 40
    # What was loaded goes to stderr, so stdout is only the reply; library chatter stays quiet.
    assert "(4-bit) + adapter" in result.stderr and "RANDOM-INIT" in result.stderr
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr


def test_greedy_replies_are_identical_across_calls(demo_run, capsys):
    outputs = []
    for _ in range(2):
        assert main([str(demo_run), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "30"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_sampling_is_seeded(loaded):
    def reply(seed: int) -> str:
        settings = GenerationSettings(max_new_tokens=30, seed=seed)
        return ask(loaded.model, loaded.tokenizer, QUESTION, loaded.fmt, settings).text

    assert reply(1) == reply(1)
    assert len({reply(seed) for seed in (1, 2, 3)}) > 1  # and the seed really reaches the sampler


def test_hide_think_prints_no_reasoning(demo_run, loaded, capsys):
    shown = ask(loaded.model, loaded.tokenizer, QUESTION, loaded.fmt, GenerationSettings(30, greedy=True))
    assert shown.think and not shown.closed  # 30 steps of training: it does not finish thinking in 30 tokens
    assert main([str(demo_run), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "30", "--hide-think"]) == 0
    out = capsys.readouterr().out
    assert "thinking" not in out and shown.think[:20] not in out
    assert "did not finish within --max-new-tokens 30" in out


def test_interactive_loop_answers_until_exit(demo_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n\n   \n/exit\nnever asked\n"))
    assert main([str(demo_run), "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("you ›") == 4  # the question, two blank lines, /exit; nothing after it
    assert out.count("thinking") == 1


def test_interactive_loop_ends_at_end_of_input(demo_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main([str(demo_run), "--max-new-tokens", "8"]) == 0
    assert "you ›" in capsys.readouterr().out


def test_merged_folder(demo_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qlora_kit.merge", str(demo_run), "--out", str(merged),
                             "--no-verify"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (merged / "adapter").exists()
    assert main([str(merged), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert "merged model (RANDOM-INIT base, demo: expect nonsense)" in captured.err
    assert "compute float32" in captured.err
    assert "thinking" in captured.out and len(captured.out.strip()) > 20


def test_merged_folder_prompts_in_the_format_the_run_trained_on(demo_run, tmp_path):
    """A custom data.format travels into the merged folder (qlora_kit_recipe.toml): chat asks the merged model in
    that format, as on the run, not in the chat template it never saw."""
    import shutil

    from qlora_kit.chat.loading import load_merged

    merged = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qlora_kit.merge", str(demo_run), "--out", str(merged),
                             "--no-verify"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (merged / "qlora_kit_recipe.toml").read_text() == (demo_run / "recipe.toml").read_text()
    assert load_merged(merged).fmt.prompt("Q?").endswith("<｜Assistant｜><think>\n")  # the run's chat format

    custom = tmp_path / "custom"
    shutil.copytree(merged, custom)
    recipe = (custom / "qlora_kit_recipe.toml").read_text()
    template = 'format = "诊断问题：{question}\\n详细分析：{cot}\\n### 答案：\\n{response}"'
    recipe = recipe.replace('format = "chat"', template)
    (custom / "qlora_kit_recipe.toml").write_text(recipe)
    fmt = load_merged(custom).fmt
    assert fmt.prompt("Q?") == "诊断问题：Q?\n详细分析：" and fmt.separator == "### 答案："


def test_run_adapter_folder_is_taken_as_its_run(demo_run, capsys):
    assert main([str(demo_run / "adapter"), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "5"]) == 0
    assert f"run {demo_run}" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [
    ("missing", "Not found"),
    ("empty", "neither a run directory nor a merged model folder"),
    ("unfinished", "holds an unfinished run"),
    ("bare adapter", "bare adapter without its run's recipe.toml"),
    ("file", "is a file, not a folder"),
])
def test_folders_that_are_not_models_exit_2(tmp_path, capsys, layout, message):
    target = tmp_path / "target"
    if layout == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif layout == "unfinished":
        (target / "checkpoints").mkdir(parents=True)
        (target / "recipe.toml").write_text("[train]\nmax_steps = 5\n")
    elif layout == "bare adapter":
        target.mkdir()
        (target / "adapter_config.json").write_text("{}")
    elif layout == "file":
        target.write_text("not a folder")
    assert main([str(target), "--prompt", QUESTION]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ prompts


def training_prompt_ids(tokenizer, data: DataSection, question: str) -> list[int]:
    """The prompt part of a training example, as encode.py builds it."""
    renderer, _ = make_renderer(tokenizer, data)
    example = Encoder(tokenizer, renderer).encode(Row(question, "some reasoning", "some answer", 1))
    return example.input_ids[:example.prompt_length]


def test_chat_prompt_is_the_training_prompt_ending_inside_the_think_block(demo_tokenizer):
    fmt = prompt_format(demo_tokenizer, DataSection())
    ids = fmt.prompt_ids(demo_tokenizer, QUESTION)
    assert ids == training_prompt_ids(demo_tokenizer, DataSection(), QUESTION)
    assert ids.count(demo_tokenizer.bos_token_id) == 1 and ids[0] == demo_tokenizer.bos_token_id
    assert fmt.prompt(QUESTION).endswith("<｜Assistant｜><think>\n") and fmt.separator == "</think>"


def test_older_r1_template_keeps_its_own_generation_prompt():
    """Older R1 templates end the generation prompt at the assistant tag; training opened the think block in
    the completion, so the model learned to open it itself: the prompt is the template's, nothing added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "qlora_kit" / "demo" / "tiny-qwen2")
    tokenizer.chat_template = tokenizer.chat_template.replace("<think>\\n", "")
    data = DataSection(system_prompt="Be brief.")
    fmt = prompt_format(tokenizer, data)
    prompt = fmt.prompt(QUESTION)
    assert prompt.endswith("<｜Assistant｜>") and "<think>" not in prompt and "Be brief." in prompt
    assert not fmt.starts_inside(QUESTION)  # the model decides: a reply opening <think> is reasoning, else answer
    renderer, _ = make_renderer(tokenizer, data)
    pair = renderer(Row(QUESTION, "cot", "answer", 1))
    assert pair.prompt == prompt and pair.completion.startswith("<think>\ncot\n</think>")
    split = fmt.split(pair.completion, fmt.starts_inside(QUESTION))
    assert (split.think, split.answer, split.closed) == ("cot", "answer", True)


def test_plain_format_prompt_and_separator(demo_tokenizer):
    data = DataSection(format="plain")
    fmt = prompt_format(demo_tokenizer, data)
    assert fmt.prompt(QUESTION).endswith("### Reasoning:\n") and fmt.separator == "### Answer:"
    assert fmt.prompt_ids(demo_tokenizer, QUESTION) == training_prompt_ids(demo_tokenizer, data, QUESTION)
    split = fmt.split("It is 39.8.\n\n### Answer:\nYes.", fmt.starts_inside(QUESTION))
    assert (split.think, split.answer) == ("It is 39.8.", "Yes.")
    assert template_separator(PLAIN_TEMPLATE) == "### Answer:"
    assert template_separator("Q: {question}\nA: {response}") is None




# ------------------------------------------------------------------------------------------------ think / answer


@pytest.mark.parametrize("text, expected", [
    ("The temperature is 39.8.\n</think>\n\nYes, a fever.", ("The temperature is 39.8.", "Yes, a fever.")),
    ("Still thinking when the tokens ran out", ("Still thinking when the tokens ran out", "")),
    ("<think>\nreasoning\n</think>\n\nanswer", ("reasoning", "answer")),
    ("\n</think>\n\nanswer without reasoning", ("", "answer without reasoning")),
    ("a</think>b</think>c", ("a", "bc")),  # the first closer ends the reasoning; a stray second one is not answer
    ("", ("", "")),
])
def test_split_think(text, expected):
    split = split_think(text)
    assert (split.think, split.answer) == expected
    assert split.opened and split.closed == ("</think>" in text)


@pytest.mark.parametrize("text, expected", [
    ("The capital of France is Paris.", ("", "The capital of France is Paris.", False, False)),  # answered directly
    ("<think>\nFrance.\n</think>\n\nParis.", ("France.", "Paris.", True, True)),  # opened the block itself
    ("  <think>\nstill thinking", ("still thinking", "", True, False)),
    ("Paris.</think>", ("", "Paris.", False, False)),  # a closer without an opener is not reasoning
])
def test_split_think_when_the_model_decides_whether_to_reason(text, expected):
    split = split_think(text, starts_inside=False)
    assert (split.think, split.answer, split.opened, split.closed) == expected


def test_split_without_a_reasoning_part():
    split = split_think("  just an answer\n", separator=None)
    assert (split.think, split.answer, split.opened) == ("", "just an answer", False)


def route(pieces: list[str], separator: str | None = "</think>", starts_inside: bool = True) -> tuple[str, str, int]:
    think, answer, switches = [], [], []
    router = ThinkRouter(separator, think.append, answer.append, lambda: switches.append(1), opener="<think>",
                         starts_inside=starts_inside)
    for piece in pieces:
        router.feed(piece)
    router.close()
    return "".join(think), "".join(answer), len(switches)


@pytest.mark.parametrize("starts_inside", [True, False])
@pytest.mark.parametrize("text", [
    "The temperature is 39.8.\n</think>\n\nYes, a fever.",
    "no closer here, it ends with </thi",
    "x < y <tag> </ </th </think>\n\n  answer with </think> inside",
    "<think>\nopened by the model\n</think>\n\nanswer",
    "  <thi",
    "<the answer starts like a tag",
])
def test_streamed_split_equals_split_think_however_the_text_is_cut(text, starts_inside):
    expected = split_think(text, starts_inside=starts_inside)
    for size in (1, 2, 3, 7, len(text)):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        think, answer, switches = route(pieces, starts_inside=starts_inside)
        assert (think.strip(), answer.strip()) == (expected.think, expected.answer), pieces
        assert answer == answer.lstrip()  # the blank line after </think> is not passed on
        assert switches == expected.closed


def test_streamed_text_without_a_reasoning_part_is_all_answer():
    assert route(["a </think> b"], separator=None) == ("", "a </think> b", 0)


def test_reply_printer_layout():
    from rich.console import Console

    from qlora_kit.chat.generate import Reply

    def show(show_think: bool) -> str:
        console = Console(file=io.StringIO(), width=60, soft_wrap=True)
        printer = ReplyPrinter(console, show_think)
        for piece in ("39.8 is at ", "least 38.0.\n"):
            printer.think(piece)
        printer.switch()
        printer.answer("Yes, a fever.")
        printer.finish(Reply("", "", "", 9, finished=True, closed=True), GenerationSettings())
        return console.file.getvalue()

    shown, hidden = show(True), show(False)
    assert shown.index("thinking") < shown.index("39.8 is at least 38.0.\n") < shown.index("answer") \
        < shown.index("Yes, a fever.\n")
    assert hidden == "Yes, a fever.\n"


def test_generation_finds_the_input_device_of_an_offloaded_embedding(tmp_path):
    """memory.embeddings_on_cpu on a GPU: accelerate keeps the embedding off the device (its parameter reads
    `meta` between passes) and runs it on the execution device. A disk offload on CPU is the same mechanism."""
    import torch
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qlora_kit.chat.generate import input_device

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = dispatch_model(AutoModelForCausalLM.from_config(config).eval(),
                           device_map={"model.embed_tokens": "disk", "": "cpu"}, offload_dir=str(tmp_path))
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    ids = torch.tensor([[1, 2, 3]], device=input_device(model))
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                          do_sample=False).shape == (1, 6)
