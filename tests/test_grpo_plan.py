"""The planner's GRPO terms (qlora_kit.plan.grpo): checked against every live tensor of real GRPOTrainer steps on CPU
(qlora_kit.plan.tensor_peak, as tests/test_plan.py checks the SFT terms), and its answers for the target models on
an 8 GB card."""

from __future__ import annotations

import json

import pytest

from qlora_kit.plan.architectures import ARCHITECTURES, published_config
from qlora_kit.plan.estimate import GIB, Architecture, estimate, make_plan
from qlora_kit.recipe.loading import recipe_from_dict

GENERATION = "generation: KV cache of {} completions"


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, demo_tokenizer):
    """A config-only Qwen2 with the demo tokenizer, wide enough that its KV cache and activations, not bitsandbytes'
    tables, are what a step allocates."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("wide-qwen2")
    Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=576, tie_word_embeddings=False, initializer_range=0.1,
                bos_token_id=demo_tokenizer.bos_token_id, eos_token_id=demo_tokenizer.eos_token_id,
                pad_token_id=demo_tokenizer.pad_token_id).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


def grpo_recipe(model_dir, rows, **train):
    completion = 96
    return recipe_from_dict({
        "model": {"name": str(model_dir), "init": "random"}, "lora": {"r": 16, "dropout": 0.0},
        "data": {"source": str(rows), "max_length": 256, "shuffle": False},
        "train": {"method": "grpo", "max_steps": 2, "batch_size": 1, "grad_accum": 4, "save_steps": 0,
                  "gradient_checkpointing": True, "learning_rate": 1e-3, **train},
        "grpo": {"num_generations": 4, "max_completion_length": completion, "rewards": {"format": 1.0}},
        "output": {"dir": "unused"}})


@pytest.mark.parametrize(("accumulate", "generations"), [(64, 16), (4, 4)], ids=["generation-peak", "loss-peak"])
def test_the_grpo_plan_matches_the_live_tensors_of_real_steps(tmp_path, wide_model_dir, accumulate, generations):
    """Two real GRPOTrainer steps (NF4, LoRA, generation through model.generate), every live tensor counted. The
    completions are held to full length (min_new_tokens), prompts all the same length, so data.max_length is the
    real prompt + completion and the plan's bound is tight. Within 10 %, and the peak's phase named right."""
    import dataclasses

    from rich.console import Console
    from trl import GRPOConfig

    from qlora_kit.data.checkable import build_grpo_examples
    from qlora_kit.data.replies import stop_ids
    from qlora_kit.model.loading import choose_precision, keep_adapter_fp32, load_tokenizer
    from qlora_kit.plan.tensor_peak import LiveTensorBytes
    from qlora_kit.recipe.trainer_arguments import grpo_arguments
    from qlora_kit.train.grpo import load_policy, trainer_class
    from qlora_kit.train.rewards import build_rewards

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(1, 9)), encoding="utf-8")
    recipe = grpo_recipe(wide_model_dir, rows, grad_accum=accumulate)
    recipe.grpo.num_generations = generations
    tokenizer = load_tokenizer(recipe.model)
    examples = build_grpo_examples(recipe, tokenizer, Console(quiet=True))
    prompt = max(len(p.prompt_ids) for p in examples.train)
    assert min(len(p.prompt_ids) for p in examples.train) == prompt  # one length: no padding in the measurement
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_length=prompt + 96))

    precision = choose_precision(recipe.quant)
    model = load_policy(recipe, precision)
    rewards = build_rewards(recipe, tokenizer, stop_ids(model, tokenizer))
    arguments = grpo_arguments(recipe, precision, tmp_path, [r.weight for r in rewards])
    arguments["generation_kwargs"] = {"use_cache": True, "min_new_tokens": 96}  # full length, as the plan assumes
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": p.prompt, **p.row.fields()} for p in examples.train])
    trainer = trainer_class()(model=model, reward_funcs=[r.function for r in rewards], args=GRPOConfig(**arguments),
                              train_dataset=dataset, processing_class=tokenizer)
    keep_adapter_fp32(trainer.model)
    with LiveTensorBytes("cpu", trainer.model) as counter:
        trainer.train()

    arch = Architecture.from_config(json.loads((wide_model_dir / "config.json").read_text()))
    planned = estimate(arch, recipe, device="cpu")
    error = planned.allocated / counter.peak_bytes - 1
    assert abs(error) < 0.10, f"planned {planned.allocated / 2**20:.1f} MiB, measured " \
                              f"{counter.peak_bytes / 2**20:.1f} MiB ({error:+.1%}); phases {planned.phases}"
    generation = GENERATION.format(accumulate)
    assert (max(planned.phases, key=planned.phases.get) == generation) == (accumulate == 64)


def plan_for(model_id: str, **changes):
    recipe = recipe_from_dict({"model": {"name": model_id}, "lora": {"dropout": 0.05},
                               "data": {"max_length": changes.get("max_length", 1024)},
                               "train": {"method": "grpo", "batch_size": 1,
                                         "grad_accum": changes.get("generations", 8)},
                               "grpo": {"num_generations": changes.get("generations", 8),
                                        "max_completion_length": changes.get("completion", 768)}})
    return make_plan(Architecture.from_config(published_config(model_id), model_id), recipe, 8.0)


def test_the_kv_cache_term_is_exact():
    from qlora_kit.plan.grpo import kv_cache_gib

    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-7b"], "7b")
    recipe = recipe_from_dict({"train": {"method": "grpo", "batch_size": 1, "grad_accum": 8},
                               "grpo": {"num_generations": 8}, "data": {"max_length": 1024}})
    # K and V, 28 layers, 4 kv heads x 128, 8 sequences x 1024 tokens, 2 bytes
    assert kv_cache_gib(arch, recipe) == pytest.approx(2 * 28 * 4 * 128 * 8 * 1024 * 2 / GIB)


def test_generation_grows_with_the_completions_and_sft_plans_are_unchanged():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-7b"], "7b")
    sft = recipe_from_dict({"data": {"max_length": 1024}})
    grpo = recipe_from_dict({"data": {"max_length": 1024}, "train": {"method": "grpo", "grad_accum": 8},
                             "grpo": {"num_generations": 8}})
    assert not any(name.startswith("generation") for name in estimate(arch, sft).phases)
    more = recipe_from_dict({"data": {"max_length": 1024}, "train": {"method": "grpo", "grad_accum": 16},
                             "grpo": {"num_generations": 16}})
    assert estimate(arch, more).phases[GENERATION.format(16)] > estimate(arch, grpo).phases[GENERATION.format(8)]
    with_kl = recipe_from_dict({"data": {"max_length": 1024}, "train": {"method": "grpo", "grad_accum": 8},
                                "grpo": {"num_generations": 8, "beta": 0.04}})
    assert estimate(arch, with_kl).terms["reference adapter (grpo.beta > 0)"] == estimate(arch, grpo).terms[
        "LoRA weights (fp32)"]


@pytest.mark.parametrize(("model_id", "fits"), [("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", True),
                                                ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", True),
                                                ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", False)])
def test_will_it_fit_on_8_gb(model_id, fits):
    """docs/grpo.md's table: 8 completions of up to 768 tokens after a 256-token prompt, batch 1."""
    plan = plan_for(model_id)
    assert plan.fits == fits, (plan.peak_gib, plan.suggestion)
    if not fits:  # the switches it names make it fit
        overrides = dict(item.split("=") for item in plan.suggestion.split(" (")[0].split())
        assert overrides, plan.suggestion


def test_the_suggested_switches_make_the_8b_fit():
    plan = plan_for("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", max_length=2048, completion=1792, generations=16)
    assert not plan.fits
    text = plan.suggestion
    assert "grpo.num_generations=" in text or "grpo.max_completion_length=" in text, text
    gib = float(text.rsplit("about ", 1)[1].split(" GiB")[0])
    assert gib <= plan.budget_gib
