"""The reasoning template, token by token: one BOS, one <think>, the reasoning trained, the prompt and
padding not, the final EOS trained. Checked against the real R1-Distill tokenizer where present and
against the demo tokenizer (built in a fixture) everywhere."""

from __future__ import annotations

import copy
import logging

import pytest
from conftest import medical_rows_path

from qlora_kit.data.encode import IGNORE_INDEX, Encoder, apply_length_policy, encode_rows
from qlora_kit.data.render import make_renderer
from qlora_kit.data.rows import Row, load_rows
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import DataSection

ROW = Row("Is 38.5 C a fever?", "Normal is about 37 C.\nFever starts at 38 C, and 38.5 is above it.",
          "Yes, that is a fever.", 1)
OLD_GENERATION_PROMPT = "'<｜Assistant｜>'"  # before DeepSeek's 2025-02-09 change


def old_template_variant(tokenizer):
    """The same tokenizer with the older generation prompt that stops at <｜Assistant｜>."""
    old = copy.deepcopy(tokenizer)
    assert "'<｜Assistant｜><think>\\n'" in old.chat_template
    old.chat_template = old.chat_template.replace("'<｜Assistant｜><think>\\n'", OLD_GENERATION_PROMPT)
    return old


def encode(tokenizer, row=ROW, **data):
    renderer, _ = make_renderer(tokenizer, DataSection(**data))
    return Encoder(tokenizer, renderer).encode(row)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(params=["r1", "demo"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_chat_template_trap_is_real(tokenizer):
    """The template deletes reasoning from assistant turns: why we never render the CoT through it."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nanswer"}],
        tokenize=False)
    assert "why" not in rendered and "answer" in rendered


@pytest.mark.parametrize("variant", ["new", "old"])
def test_label_mask_token_by_token(tokenizer, variant):
    tok = tokenizer if variant == "new" else old_template_variant(tokenizer)
    example = encode(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    think_open, think_close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    ids, labels = example.input_ids, example.labels

    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids.count(think_open) == 1 and ids.count(think_close) == 1
    assert ids[-1] == eos and labels[-1] == eos, "the model must learn to stop"

    # Prompt: BOS, user turn, assistant marker (and, in the new variant, <think>\n) -- all masked.
    prompt = tok.apply_chat_template([{"role": "user", "content": ROW.question}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = ids_of(tok, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    # Completion: everything after the prompt is trained, reasoning included, exactly as written.
    completion = ids[len(prompt_ids):]
    assert labels[len(prompt_ids):] == completion
    expected = ("" if variant == "new" else "<think>\n") + f"{ROW.cot}\n</think>\n\n{ROW.response}"
    assert completion == ids_of(tok, expected) + [eos]
    assert ROW.cot.split("\n")[0] in tok.decode(completion)


def test_both_template_variants_give_the_same_tokens(tokenizer):
    new, old = encode(tokenizer), encode(old_template_variant(tokenizer))
    assert new.input_ids == old.input_ids
    # Only the mask moves: the old variant trains <think>\n, which the new one puts in the prompt.
    assert sum(old.completion_mask) - sum(new.completion_mask) == len(ids_of(tokenizer, "<think>\n"))


def test_padding_is_masked_but_eos_is_trained(tokenizer):
    """pad == eos in these tokenizers: TRL's collator must mask padding yet keep each example's EOS."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short, long = encode(tokenizer), encode(tokenizer, Row("q?", "a much longer chain " * 20, "r.", 2))
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    n = len(short.input_ids)
    assert batch["labels"][0, :n].tolist() == short.labels
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()


def test_system_prompt_goes_into_the_prompt(tokenizer):
    example = encode(tokenizer, system_prompt="You are a careful physician.")
    assert "careful physician" in tokenizer.decode(example.input_ids[: example.prompt_length])


def test_seed_tutorial_template(tokenizer):
    seed = "诊断问题：{question}\n详细分析：{cot}\n### 答案：\n{response}"
    example = encode(tokenizer, format=seed)
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(example.input_ids[1: example.prompt_length]) == f"诊断问题：{ROW.question}\n详细分析："
    assert tokenizer.decode(example.input_ids[example.prompt_length:]) == \
        f"{ROW.cot}\n### 答案：\n{ROW.response}{tokenizer.eos_token}"


def test_tokenizer_without_chat_template_falls_back_to_plain(tokenizer, caplog):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with caplog.at_level(logging.WARNING):
        example = encode(plain)
    assert "no chat template" in caplog.text
    text = plain.decode(example.input_ids)
    assert text.index(ROW.question) < text.index(ROW.cot) < text.index(ROW.response)
    assert plain.decode(example.input_ids[example.prompt_length:]).startswith(ROW.cot)


def test_length_policy(tokenizer):
    rows = [Row("q", "word " * n, "answer", i + 1) for i, n in enumerate((5, 50, 400))]
    renderer, _ = make_renderer(tokenizer, DataSection())
    examples = encode_rows(Encoder(tokenizer, renderer), rows)
    limit = len(examples[1].input_ids)

    kept, report = apply_length_policy(examples, limit, "drop")
    assert [e.row for e in kept] == [1, 2] and report.over_rows == [3]
    assert "1 row(s) longer than max_length" in "\n".join(report.lines())

    kept, report = apply_length_policy(examples, limit, "truncate")
    assert [len(e.input_ids) for e in kept] == [len(examples[0].input_ids), limit, limit]
    assert "truncated" in "\n".join(report.lines())

    # A limit inside the prompt: truncating would leave nothing to train, so those rows are dropped and said so.
    kept, report = apply_length_policy(examples, examples[0].prompt_length, "truncate")
    assert kept == [] and sorted(report.unfixable_rows) == [1, 2, 3]
    assert "3 row(s) whose prompt alone fills max_length: dropped (rows 1, 2, 3)" in report.lines()
    kept, report = apply_length_policy(examples, examples[2].prompt_length + 1, "truncate")
    assert report.unfixable_rows == [] and len(kept) == 3

    with pytest.raises(UserError, match="1 of 3 rows are longer than data.max_length"):
        apply_length_policy(examples, limit, "error")


@pytest.mark.parametrize("lang, over_512", [("en", 436), ("zh", 367)])
def test_real_rows_over_the_tutorials_512_limit(r1_tokenizer, lang, over_512):
    """With the seed tutorial's 512-token limit most real rows do not fit: we count and drop them."""
    data = DataSection(source=str(medical_rows_path(lang)), max_length=512)
    rows = load_rows(data).rows
    renderer, _ = make_renderer(r1_tokenizer, data)
    examples = encode_rows(Encoder(r1_tokenizer, renderer), rows)
    kept, report = apply_length_policy(examples, 512, "drop")
    assert len(report.over_rows) == over_512 and len(kept) == 500 - over_512
    assert all(e.input_ids.count(r1_tokenizer.bos_token_id) == 1 for e in examples)
    assert all(e.input_ids[-1] == r1_tokenizer.eos_token_id for e in examples)
    kept_2048, _ = apply_length_policy(examples, 2048, "drop")
    assert len(kept_2048) == 500  # recipes/medical.toml's max_length keeps every row


# ------------------------------------------------------------------------------------------------ answer boundary


@pytest.mark.parametrize("variant", ["new", "old"])
def test_answer_starts_right_after_the_reasoning(tokenizer, variant):
    """The eval loss is split at answer_start: before it the think block, from it the answer (with EOS)."""
    tok = tokenizer if variant == "new" else old_template_variant(tokenizer)
    example = encode(tok)
    ids, start = example.input_ids, example.answer_start
    assert example.prompt_length < start < len(ids)
    assert tok.decode(ids[start:]) == "\n\n" + ROW.response + tok.eos_token
    assert tok.decode(ids[example.prompt_length:start]).rstrip().endswith("</think>")


def test_answer_starts_at_the_response_of_a_custom_template(demo_tokenizer):
    example = encode(demo_tokenizer, format="Q: {question}\nThinking: {cot}\nAnswer: {response}")
    assert demo_tokenizer.decode(example.input_ids[example.answer_start:]).lstrip() == \
        ROW.response + demo_tokenizer.eos_token
    assert demo_tokenizer.decode(example.input_ids[example.prompt_length:example.answer_start]).rstrip().endswith(
        "Answer:")
    without_reasoning = encode(demo_tokenizer, format="Q: {question}\nA: {response}")
    assert without_reasoning.answer_start == without_reasoning.prompt_length  # all of the completion is answer


def test_real_rows_split_into_reasoning_and_answer(r1_tokenizer):
    rows = load_rows(DataSection(source=str(medical_rows_path("en")))).rows[:20]
    renderer, _ = make_renderer(r1_tokenizer, DataSection())
    for row in rows:
        example = Encoder(r1_tokenizer, renderer).encode(row)
        assert r1_tokenizer.decode(example.input_ids[example.answer_start:]) == \
            "\n\n" + row.response + r1_tokenizer.eos_token
