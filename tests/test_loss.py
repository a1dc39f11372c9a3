"""The loss we train with never materialises full-vocabulary fp32 logits: TRL's chunked log-prob head.
Checked against the plain cross-entropy on full logits: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def model_and_batch(tiny_model_dir):
    from qlora_kit.model.loading import random_model
    from qlora_kit.recipe.schema import ModelSection

    model = random_model(ModelSection(name=str(tiny_model_dir), init="random"), seed=0, dtype=torch.float32)
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 40))
    labels = input_ids.clone()
    labels[:, :12] = -100  # a prompt that is not trained
    labels[1, 30:] = -100  # padding
    return model, input_ids, labels


def plain_loss(model, input_ids, labels):
    logits = model(input_ids=input_ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def test_chunked_loss_and_gradients_equal_the_plain_loss(model_and_batch):
    from trl.trainer import utils as trl_utils

    model, input_ids, labels = model_and_batch
    reference = plain_loss(model, input_ids, labels)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    trl_utils.add_fused_lm_head(model)
    # Small vocabulary tiles, so the chunking really splits this tiny vocabulary.
    original = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 100
    try:
        fused = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = original
    assert not hasattr(fused, "logits") or fused.logits is None  # no (batch, seq, vocab) tensor came back
    assert fused.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    fused.loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
