"""The eval loss, reasoning and answer apart: token-weighted means of -log p over the trained tokens, equal to what
the model's own loss computes row by row, whatever the batching, and the adapter on or off as the caller sets it."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_kit.data.encode import Encoder, answer_mask
from qlora_kit.data.render import make_renderer
from qlora_kit.data.rows import Row
from qlora_kit.recipe.schema import DataSection
from qlora_kit.train.eval_loss import evaluate_losses


@pytest.fixture(scope="module")
def setup(demo_tokenizer, demo_rows):
    from transformers import AutoModelForCausalLM

    from qlora_kit.demo.build import tiny_qwen2_config

    config = tiny_qwen2_config(len(demo_tokenizer), bos_token_id=demo_tokenizer.bos_token_id,
                               eos_token_id=demo_tokenizer.eos_token_id, pad_token_id=demo_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    renderer, _ = make_renderer(demo_tokenizer, DataSection())
    encoder = Encoder(demo_tokenizer, renderer)
    rows = [Row(r["Question"], r["Complex_CoT"], r["Response"], n) for n, r in enumerate(demo_rows[:7], start=1)]
    return model, [encoder.encode(row) for row in rows]


def reference(model, examples, on_answer: bool | None = None) -> float:
    """Sum of the model's own per-row mean loss x its token count, over all tokens: no batching, no padding."""
    total, count = 0.0, 0
    for example in examples:
        keep = example.completion_mask if on_answer is None else [
            m and (a if on_answer else not a) for m, a in zip(example.completion_mask, answer_mask(example),
                                                             strict=True)]
        labels = torch.tensor([t if k else -100 for t, k in zip(example.input_ids, keep, strict=True)])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels[None]).loss
        n = int((labels[1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_losses_equal_the_model_s_own_loss_token_weighted(setup, batch_size):
    model, examples = setup
    losses = evaluate_losses(model, examples, batch_size=batch_size, pad_id=0)
    assert losses.rows == len(examples)
    assert losses.tokens == sum(sum(e.completion_mask) for e in examples)
    assert losses.answer_tokens == sum(sum(answer_mask(e)) for e in examples)
    assert losses.loss == pytest.approx(reference(model, examples), rel=1e-5)
    assert losses.answer_loss == pytest.approx(reference(model, examples, on_answer=True), rel=1e-5)
    assert losses.reasoning_loss == pytest.approx(reference(model, examples, on_answer=False), rel=1e-5)
    # The whole is the token-weighted mix of its two parts.
    mixed = (losses.answer_loss * losses.answer_tokens
             + losses.reasoning_loss * (losses.tokens - losses.answer_tokens)) / losses.tokens
    assert mixed == pytest.approx(losses.loss, rel=1e-9)


def test_random_model_is_near_uniform_and_metrics_are_named(setup, demo_tokenizer):
    model, examples = setup
    losses = evaluate_losses(model, examples)
    assert abs(losses.loss - math.log(len(demo_tokenizer))) < 0.5  # random init: about ln(vocab)
    assert set(losses.metrics()) == {"eval_loss", "eval_answer_loss", "eval_reasoning_loss"}


def test_adapter_off_is_the_base_and_training_mode_is_restored(setup):
    from peft import LoraConfig, get_peft_model

    model, examples = setup
    base = evaluate_losses(model, examples).loss
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()
    with_adapter = evaluate_losses(peft_model, examples).loss
    with peft_model.disable_adapter():
        without = evaluate_losses(peft_model, examples).loss
    assert peft_model.training
    assert without == pytest.approx(base, rel=1e-6) and abs(with_adapter - base) > 1e-3
    peft_model.unload()
