"""Eval loss on held-out rows, split into the reasoning and the answer: what the user reads is the answer.

    examples (input_ids, completion_mask, answer_start) ─► batches of similar length ─► the model's backbone
             ─► the LM head on the trained positions only, a tile of positions at a time, in float32
             ─► -log p(token) summed over all completion tokens, the reasoning's and the answer's (EOS included)

One definition everywhere: `loss` is the mean over every completion token of the eval rows (token-weighted, not a
mean of per-batch means), the same figure before training, at every eval step, at the end and after the merge.

Why not transformers' own evaluation loop: it returns one loss per batch and nothing per token, so it cannot
split reasoning from answer; and the LM head here runs on the completion positions only, in tiles, so neither
the prompt's logits nor a [tokens, vocabulary] float32 matrix (1.2 GB for 2,048 tokens of a 152k vocabulary)
is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_kit.data.encode import Example, answer_mask

HEAD_TILE_POSITIONS = 256
"""Positions projected through the LM head at once: 256 x 152k float32 logits is 150 MB."""


@dataclass(frozen=True)
class EvalLosses:
    loss: float
    """Mean negative log-likelihood per completion token (reasoning + answer + EOS)."""
    reasoning_loss: float | None
    """Over the reasoning tokens only (the think block); None when the rows have none."""
    answer_loss: float | None
    """Over the answer tokens only (after </think>, EOS included)."""
    rows: int
    tokens: int
    answer_tokens: int

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        values = {"loss": self.loss, "reasoning_loss": self.reasoning_loss, "answer_loss": self.answer_loss}
        return {f"{prefix}_{key}": value for key, value in values.items() if value is not None}


def decoder_parts(model):
    """(backbone, lm_head, config) of a causal LM, a PEFT model around one included (LoRA layers stay active)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    return backbone, causal_lm.get_output_embeddings(), causal_lm.config


def head_log_probs(hidden: torch.Tensor, targets: torch.Tensor, lm_head, config) -> torch.Tensor:
    """log p(target) for each row of `hidden` [positions, hidden], through the LM head a tile at a time."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None) or 1.0
    softcap = getattr(text_config, "final_logit_softcapping", None)
    out = torch.empty(len(targets), dtype=torch.float32, device=targets.device)
    for start in range(0, len(targets), HEAD_TILE_POSITIONS):
        logits = lm_head(hidden[start:start + HEAD_TILE_POSITIONS]).float() * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tile = targets[start:start + HEAD_TILE_POSITIONS].to(logits.device)
        out[start:start + len(tile)] = (logits.gather(1, tile[:, None])[:, 0] - logits.logsumexp(-1)).to(out.device)
    return out


def batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    """Rows sorted by length, then cut into batches: little padding, and a fixed order (the same every time)."""
    ordered = sorted(examples, key=lambda e: (len(e.input_ids), e.row))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate_losses(model, examples: list[Example], batch_size: int = 1, pad_id: int = 0) -> EvalLosses:
    """The eval losses of `model` as it is now (adapter on or off, as the caller set it); train mode restored."""
    backbone, lm_head, config = decoder_parts(model)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    sums = {"all": 0.0, "answer": 0.0}
    counts = {"all": 0, "answer": 0}
    try:
        for batch in batches(examples, batch_size):
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            trained = torch.zeros((len(batch), width), dtype=torch.bool)
            answer = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, example in enumerate(batch):
                n = len(example.input_ids)
                ids[i, :n] = torch.tensor(example.input_ids)
                attention[i, :n] = 1
                trained[i, :n] = torch.tensor(example.completion_mask, dtype=torch.bool)
                answer[i, :n] = torch.tensor(answer_mask(example), dtype=torch.bool)
            hidden = backbone(input_ids=ids.to(device), attention_mask=attention.to(device),
                              use_cache=False).last_hidden_state
            # Position t predicts token t + 1: the hidden states before each trained token.
            where = trained[:, 1:]
            log_probs = head_log_probs(hidden[:, :-1][where.to(hidden.device)], ids[:, 1:][where].to(hidden.device),
                                       lm_head, config).cpu()
            on_answer = answer[:, 1:][where]
            sums["all"] -= float(log_probs.sum())
            sums["answer"] -= float(log_probs[on_answer].sum())
            counts["all"] += int(where.sum())
            counts["answer"] += int(on_answer.sum())
    finally:
        model.train(was_training)
    reasoning_tokens = counts["all"] - counts["answer"]
    return EvalLosses(
        loss=sums["all"] / counts["all"] if counts["all"] else math.nan,
        reasoning_loss=(sums["all"] - sums["answer"]) / reasoning_tokens if reasoning_tokens else None,
        answer_loss=sums["answer"] / counts["answer"] if counts["answer"] else None,
        rows=len(examples), tokens=counts["all"], answer_tokens=counts["answer"])
