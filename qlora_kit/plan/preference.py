"""The preference-tuning terms of the plan (train.method = "dpo", "kto", "orpo"): what a step of TRL's DPOTrainer,
KTOTrainer or ORPOTrainer holds besides what an SFT step does.

- DPO and ORPO run the chosen and the rejected side of every pair through the policy in one batch: twice the
  sequences of an SFT step at the same batch_size, each padded to data.max_length at worst; the SFT terms apply to
  those 2 x batch_size sequences (activations, the chunked loss, the recomputed layer).
- KTO runs each answer once with gradients, plus its KL completion (the answer under another prompt of the batch)
  without: the SFT terms at batch_size sequences, and a no-grad pass over twice as many.
- DPO and KTO's reference: with the adapter off (or the SFT adapter, a copy of the adapter's weights: "ref") a
  second, no-grad forward over the same sequences while the policy's saved activations are still held: one layer's
  forward and one tile of the log-probability kernel at a time, so it is smaller than the policy's loss pass and
  never the peak. pref.precompute_ref_log_probs moves it before training (no policy activations then).
- ORPO (trl.experimental, the older trainer) materialises the full logits of every sequence, and log-softmaxes them
  in float32 for its NLL and odds-ratio terms: tokens x vocabulary x ORPO_LOGIT_BYTES, which dominates at long
  lengths and large vocabularies (R1-Distill-Qwen: 151,936 columns).

tests/test_preference_plan.py checks each method's total against the live tensors of a real TRL step on CPU
(qlora_kit.plan.tensor_peak).
"""

from __future__ import annotations

from qlora_kit.recipe.schema import PREFERENCE_METHODS

ORPO_LOGIT_FP32_COPIES = 3.5
"""ORPO's full-vocabulary tensors at its loss backward, in float32 widths per token x vocabulary: the logits'
float32 upcast, the log-softmax of every sequence and its gradient, the chosen half's cross-entropy log-softmax and
its gradient (half the tokens each), on top of the logits in the compute dtype. Fitted to the live tensors of a
real step on CPU (tests/test_preference_plan.py)."""


def is_preference(recipe) -> bool:
    return recipe.train.method in PREFERENCE_METHODS


def sequences_per_row(recipe) -> int:
    """Sequences a row puts through the policy with gradients: both sides of a pair (DPO, ORPO), one answer (KTO)."""
    return 1 if recipe.train.method == "kto" else 2


def orpo_logits_bytes(arch, tokens: int, compute_bytes: int) -> float:
    """ORPO's full logits (compute dtype) and their float32 copies, for `tokens` tokens of both sides."""
    return tokens * arch.vocab * (compute_bytes + ORPO_LOGIT_FP32_COPIES * 4)
