"""The GRPO rewards (qlora_kit.train.rewards) on hand-made completions: an R1 prompt (the template opens the think
block) and a ChatML prompt (the model opens it itself), missing </think>, two think blocks, no EOS, and each answer
check. Called exactly as TRL's GRPOTrainer calls them: lists over a batch, the data set's columns as keywords."""

from __future__ import annotations

import pytest

from qlora_kit.data.render import THINK_CLOSE, THINK_OPEN
from qlora_kit.data.replies import Markers, read_reply
from qlora_kit.train.rewards import (
    ChoiceReward,
    ExactReward,
    FormatReward,
    LengthReward,
    NumericReward,
    load_reward_file,
)

EOS = 2
R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Which vitamin?<｜Assistant｜><think>\n"
CHATML_PROMPT = "<|im_start|>user\nWhich vitamin?<|im_end|>\n<|im_start|>assistant\n"
MARKERS = Markers(THINK_CLOSE, THINK_OPEN)


def score(reward, prompt: str, text: str, eos: bool = True, **row):
    """One completion through the reward as TRL calls it. `eos`: whether its last id is the EOS id."""
    ids = [5, 6, 7] + ([EOS] if eos else [])
    fields = {key: [value] for key, value in row.items()}
    return reward(prompts=[prompt], completions=[text], completion_ids=[ids], **fields)[0]


FORMAT_CASES = [
    # (prompt, completion text, ends with EOS, in format?)
    (R1_PROMPT, "Scurvy is vitamin C.\n</think>\n\nC", True, True),
    (CHATML_PROMPT, "<think>\nScurvy is vitamin C.\n</think>\n\nC", True, True),
    (R1_PROMPT, "Scurvy is vitamin C. C", True, False),  # missing </think>
    (CHATML_PROMPT, "<think>\nScurvy is vitamin C. C", True, False),  # opened, never closed
    (CHATML_PROMPT, "C", True, False),  # answered directly: no think block at all
    (R1_PROMPT, "a\n</think>\nb\n<think>\nc\n</think>\n\nC", True, False),  # two think blocks
    (CHATML_PROMPT, "<think>a</think><think>b</think>C", True, False),  # two think blocks
    (R1_PROMPT, "<think>\na\n</think>\n\nC", True, False),  # a second <think> after the template's own
    (R1_PROMPT, "Scurvy is vitamin C.\n</think>\n\nC", False, False),  # no EOS: cut at the limit
    (R1_PROMPT, "Scurvy is vitamin C.\n</think>\n\n", True, False),  # empty answer
]


@pytest.mark.parametrize(("prompt", "text", "eos", "expected"), FORMAT_CASES)
def test_format_reward(prompt, text, eos, expected):
    assert score(FormatReward(MARKERS, {EOS}), prompt, text, eos) == float(expected)


@pytest.mark.parametrize(("prompt", "text", "eos", "expected"), FORMAT_CASES)
def test_format_reward_is_the_samples_rule(prompt, text, eos, expected):
    """The reward and samples.md's format count (a chat Reply) agree on every case, two think blocks included."""
    from qlora_kit.chat.generate import Reply

    split = read_reply(text, prompt, MARKERS)
    reply = Reply(split.think, split.answer, text, 4, finished=eos, closed=split.closed, opened=split.opened,
                  blocks=split.blocks)
    assert reply.in_format == expected


def test_the_format_reads_markers_from_the_real_templates(demo_tokenizer, r1_tokenizer):
    """The demo's and the real R1 template both end the prompt inside the think block."""
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.replies import markers_for
    from qlora_kit.data.rows import Row
    from qlora_kit.recipe.schema import DataSection

    for tokenizer in (demo_tokenizer, r1_tokenizer):
        prompt = make_renderer(tokenizer, DataSection())[0](Row("Which vitamin?", "", "", 1)).prompt
        markers = markers_for(tokenizer, DataSection())
        assert markers.starts_inside(prompt)
        assert score(FormatReward(markers, {EOS}), prompt, "because\n</think>\n\nC") == 1.0


def test_plain_format_uses_the_template_separator(demo_tokenizer):
    from qlora_kit.data.replies import markers_for
    from qlora_kit.recipe.schema import DataSection

    markers = markers_for(demo_tokenizer, DataSection(format="plain"))
    assert markers == Markers("### Answer:", None)
    prompt = "### Question:\nWhich?\n\n### Reasoning:\n"
    assert score(FormatReward(markers, {EOS}), prompt, "because\n\n### Answer:\nC") == 1.0
    assert score(ChoiceReward(markers, {EOS}), prompt, "because\n\n### Answer:\nC", kind="choice", answer="C",
                 letters="ABCD") == 1.0


@pytest.mark.parametrize(("prompt", "text", "expected"), [
    (R1_PROMPT, "C is vitamin C\n</think>\n\nThe answer is C.", 1.0),
    (R1_PROMPT, "thinking\n</think>\n\n(C)", 1.0),
    (R1_PROMPT, "thinking\n</think>\n\n**B**", 0.0),
    (R1_PROMPT, "C is right, surely C", 0.0),  # the letter only inside reasoning that never closed
    (CHATML_PROMPT, "<think>\nhmm\n</think>\nC. Vitamin C", 1.0),
    (CHATML_PROMPT, "C", 1.0),  # a direct answer is read as it stands (format scores the missing block)
    (CHATML_PROMPT, "<think>\nhmm\n</think>\nno idea", 0.0),
])
def test_choice_reward(prompt, text, expected):
    assert score(ChoiceReward(MARKERS, {EOS}), prompt, text, kind="choice", answer="C", letters="ABCD") == expected


def test_answer_rewards_skip_rows_they_do_not_check():
    """None for rows of another kind: TRL leaves them out of that reward's mean."""
    text = "x\n</think>\n\n60"
    assert score(ChoiceReward(MARKERS, {EOS}), R1_PROMPT, text, kind="numeric", answer="60", letters="") is None
    assert score(ExactReward(MARKERS, {EOS}), R1_PROMPT, text, kind="numeric", answer="60", letters="") is None
    assert score(NumericReward(MARKERS, {EOS}), R1_PROMPT, text, kind="choice", answer="C", letters="AB") is None


@pytest.mark.parametrize(("answer", "reference", "expected"), [
    ("The dose is 60 mg.", "60", 1.0),
    ("60", "60.0", 1.0),
    ("1,200", "1200", 1.0),
    ("about 7.50", "7.5", 1.0),
    ("-3", "−3", 1.0),
    ("59", "60", 0.0),
    ("60 then 61", "60", 0.0),  # the last number counts
    ("no number", "60", 0.0),
])
def test_numeric_reward(answer, reference, expected):
    text = f"reasoning with 12 and 5\n</think>\n\n{answer}"
    assert score(NumericReward(MARKERS, {EOS}), R1_PROMPT, text, kind="numeric", answer=reference) == expected


def test_numeric_reward_needs_the_reasoning_closed():
    assert score(NumericReward(MARKERS, {EOS}), R1_PROMPT, "12 times 5 is 60", kind="numeric", answer="60") == 0.0


@pytest.mark.parametrize(("answer", "expected"), [("Scurvy", 1.0), (" scurvy. ", 1.0), ("**Scurvy**", 1.0),
                                                  ("It is scurvy", 0.0), ("rickets", 0.0)])
def test_exact_reward(answer, expected):
    text = f"vitamin C deficiency\n</think>\n\n{answer}"
    assert score(ExactReward(MARKERS, {EOS}), R1_PROMPT, text, kind="exact", answer="scurvy") == expected


def test_length_reward_is_trls_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    ours, theirs = LengthReward(MARKERS, {EOS}, 20, 5), get_soft_overlong_punishment(20, 5)
    lengths = [1, 10, 15, 16, 18, 20]
    ids = [[7] * n for n in lengths]
    expected = theirs(completion_ids=ids)
    assert ours(prompts=[""] * 6, completions=[""] * 6, completion_ids=ids) == expected
    assert expected == [0.0, 0.0, 0.0, -0.2, -0.6, -1.0]


def test_reading_a_completion():
    reading = read_reply("<think>\nwhy\n</think>\n\nC", CHATML_PROMPT, MARKERS)
    assert (reading.think, reading.answer, reading.opened, reading.closed, reading.blocks) == ("why", "C", True, True,
                                                                                               1)
    assert read_reply("why\n</think>\n\nC", R1_PROMPT, MARKERS).blocks == 1


def test_a_reward_of_your_own_from_its_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def short(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    function = load_reward_file(f"{path}:short")
    assert function(prompts=["p"], completions=["abc"], completion_ids=[[1]]) == [0.25]


def test_a_reward_file_that_is_missing_or_wrong_is_named(tmp_path):
    from qlora_kit.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        load_reward_file(f"{tmp_path / 'none.py'}:f")
    (tmp_path / "bad.py").write_text("def other(**kwargs):\n    return []\n")
    with pytest.raises(UserError, match="no function `score`") as error:
        load_reward_file(f"{tmp_path / 'bad.py'}:score")
    assert "other" in error.value.hint
    (tmp_path / "broken.py").write_text("import nothing_by_this_name\n")
    with pytest.raises(UserError, match="importing .* failed: ModuleNotFoundError"):
        load_reward_file(f"{tmp_path / 'broken.py'}:score")


def test_the_live_view_shows_the_rewards_of_a_grpo_step():
    """What GRPOTrainer logs, as the plain status line and the live panel show it (SFT logs none of these keys)."""
    from types import SimpleNamespace

    from rich.console import Console

    from qlora_kit.train.status import StatusCallback

    console = Console(record=True, width=200)
    status = StatusCallback("GRPO", console, live=False)
    state = SimpleNamespace(global_step=3, max_steps=10)
    status.on_train_begin(None, state, None)
    status.on_log(None, state, None, logs={
        "loss": 0.01, "reward": 0.8125, "reward_std": 0.25, "rewards/format/mean": 0.95, "rewards/choice/mean": 0.5,
        "rewards/choice/std": 0.5, "completions/mean_length": 212.0, "completions/clipped_ratio": 0.0625,
        "kl": 0.0021, "learning_rate": 1e-5})
    line = console.export_text()
    assert "reward 0.812 ± 0.250 (format 0.95, choice 0.50)" in line
    assert "length 212, 6% clipped, kl 0.0021" in line
    panel = Console(record=True, width=200)
    panel.print(status.render(state))
    text = panel.export_text()
    assert "reward" in text and "0.812 ± 0.250" in text and "completions" in text
