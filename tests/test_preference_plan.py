"""The planner's preference terms (qlora_kit.plan.preference): checked against every live tensor of real DPO, KTO and
ORPO steps on CPU (qlora_kit.plan.tensor_peak, as tests/test_plan.py checks the SFT terms), and its answers for the
target models on an 8 GB card (docs/preference.md's table)."""

from __future__ import annotations

import json
import random

import pytest

from qlora_kit.plan.architectures import published_config
from qlora_kit.plan.estimate import Architecture, estimate, make_plan
from qlora_kit.recipe.loading import recipe_from_dict

LENGTH = 256


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, demo_tokenizer):
    """A config-only Qwen2 with the demo tokenizer and a 16,384-column head: wide enough that activations and logits,
    not bitsandbytes' tables, are what a step allocates."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("wide-qwen2")
    Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=False,
                bos_token_id=demo_tokenizer.bos_token_id, eos_token_id=demo_tokenizer.eos_token_id,
                pad_token_id=demo_tokenizer.pad_token_id).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("method", "checkpointing"), [("dpo", True), ("dpo", False), ("kto", True),
                                                       ("orpo", True)])
def test_the_preference_plan_matches_the_live_tensors_of_real_steps(tmp_path, wide_model_dir, demo_tokenizer,
                                                                    method, checkpointing):
    """Two real steps of TRL's trainer (NF4, LoRA), every live tensor counted; every side of the same length, so
    data.max_length is the real length and the plan's bound is tight. Within 10 %."""
    from qlora_kit.data.pairs import PairExample, RatedExample, to_preference_dataset
    from qlora_kit.model.loading import choose_precision, keep_adapter_fp32
    from qlora_kit.plan.tensor_peak import LiveTensorBytes
    from qlora_kit.recipe.trainer_arguments import preference_arguments, preference_config_class
    from qlora_kit.train.grpo import load_policy
    from qlora_kit.train.preference import trainer_class

    recipe = recipe_from_dict({
        "model": {"name": str(wide_model_dir), "init": "random"}, "lora": {"r": 16, "dropout": 0.0},
        "data": {"source": "unused.jsonl", "max_length": LENGTH, "shuffle": False},
        "train": {"method": method, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "save_steps": 0,
                  "gradient_checkpointing": checkpointing, "learning_rate": 1e-3}, "output": {"dir": "unused"}})
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(10, len(demo_tokenizer)) for _ in range(n)]

    examples = [RatedExample(i, ids(64), ids(LENGTH - 64), i % 2 == 0) if method == "kto" else
                PairExample(i, ids(64), ids(LENGTH - 64), ids(LENGTH - 64)) for i in range(8)]
    precision = choose_precision(recipe.quant)
    model = load_policy(recipe, precision)
    config = preference_config_class(method)(**preference_arguments(recipe, precision, tmp_path))
    trainer = trainer_class(method)(model=model, args=config, train_dataset=to_preference_dataset(examples),
                                    processing_class=demo_tokenizer)
    keep_adapter_fp32(trainer.model)
    with LiveTensorBytes("cpu", trainer.model) as counter:
        trainer.train()

    arch = Architecture.from_config(json.loads((wide_model_dir / "config.json").read_text()))
    planned = estimate(arch, recipe, device="cpu")
    error = planned.allocated / counter.peak_bytes - 1
    assert abs(error) < 0.10, f"planned {planned.allocated / 2**20:.1f} MiB, measured " \
                              f"{counter.peak_bytes / 2**20:.1f} MiB ({error:+.1%}); phases {planned.phases}"


def plan_for(model_id: str, method: str, max_length: int = 1024, **memory):
    recipe = recipe_from_dict({"model": {"name": model_id}, "data": {"max_length": max_length},
                               "train": {"method": method, "batch_size": 1, "grad_accum": 8}, "memory": memory})
    return make_plan(Architecture.from_config(published_config(model_id), model_id), recipe, 8.0)


QWEN_1_5B, QWEN_7B, LLAMA_8B = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                                "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")


@pytest.mark.parametrize(("model_id", "method", "fits"), [
    (QWEN_1_5B, "dpo", True), (QWEN_1_5B, "kto", True), (QWEN_1_5B, "orpo", False),
    (QWEN_7B, "dpo", False), (QWEN_7B, "kto", True), (LLAMA_8B, "dpo", False)])
def test_will_it_fit_on_8_gb_at_1024_tokens(model_id, method, fits):
    """docs/preference.md's table: batch 1, 1,024 tokens (prompt + the longer side)."""
    plan = plan_for(model_id, method)
    assert plan.fits == fits, (plan.peak_gib, plan.suggestion)


def test_a_dpo_pair_costs_more_than_an_sft_row_and_the_switches_make_the_7b_fit():
    sft, dpo = plan_for(QWEN_7B, "sft"), plan_for(QWEN_7B, "dpo")
    assert dpo.peak_gib > sft.peak_gib and dpo.max_length_fit < sft.max_length_fit
    assert "memory.embeddings_on_cpu=true" in dpo.suggestion
    assert plan_for(QWEN_7B, "dpo", embeddings_on_cpu=True).fits
    assert "offload_activations" not in plan_for(QWEN_1_5B, "orpo").suggestion  # ORPO has none: never advised
