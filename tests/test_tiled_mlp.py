"""memory.tiled_mlp: the sequence-tiled MLP trains exactly like the plain one (same losses, same adapter), keeps
LoRA dropout's masks and data parallelism's one-gradient-per-step rule, and lowers the step's peak where it
matters (past one slice)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, encode_for_training, run_cli

from qlora_kit.data.encode import to_dataset
from qlora_kit.errors import UserError
from qlora_kit.model.loading import add_lora, choose_precision, load_model
from qlora_kit.model.tiled_mlp import tile_mlps
from qlora_kit.recipe.loading import load_recipe
from qlora_kit.train.fit import build_trainer

DEMO = REPO / "recipes" / "demo.toml"


def train_demo(tmp_path, slice_tokens: int | None, steps: int = 4, overrides: tuple = ()):
    recipe = load_recipe(DEMO, [f"train.max_steps={steps}", "train.eval_steps=0", "data.eval_rows=0",
                                "train.logging_steps=1", "train.save_steps=0", f"output.dir={tmp_path}", *overrides])
    tokenizer, _, _, examples = encode_for_training(recipe)
    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(examples), None, precision, tmp_path, [])
    if slice_tokens:
        # Demo rows are shorter than a slice (1,024 tokens): slices of 16 make every MLP really tile.
        assert tile_mlps(trainer.model, slice_tokens) == 2
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return losses, adapter


def test_tiled_training_equals_plain_training(tmp_path):
    plain_losses, plain_adapter = train_demo(tmp_path / "plain", None)
    tiled_losses, tiled_adapter = train_demo(tmp_path / "tiled", 16)
    assert len(plain_losses) == 4
    assert tiled_losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain_adapter.keys() == tiled_adapter.keys()
    for name, weight in plain_adapter.items():
        torch.testing.assert_close(tiled_adapter[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_the_recipe_switch_tiles_every_decoder_mlp(tmp_path):
    recipe = load_recipe(DEMO, ["memory.tiled_mlp=true", "train.eval_steps=0", "data.eval_rows=0",
                                f"output.dir={tmp_path}"])
    tokenizer, _, _, examples = encode_for_training(recipe)
    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(examples), None, precision, tmp_path, [])
    tiled = [name for name, module in trainer.model.named_modules() if getattr(module, "_qlora_kit_tiled", False)]
    assert len(tiled) == 2 and all(name.endswith("mlp") for name in tiled)


def test_a_run_whose_sequences_fit_one_slice_says_the_switch_does_nothing(tmp_path):
    done = run_cli(DEMO, "memory.tiled_mlp=true", "train.max_steps=2", "samples.count=0", f"output.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "memory.tiled_mlp changes nothing here" in done.stdout


def test_tiled_mlp_and_fsdp_are_refused_together():
    with pytest.raises(UserError) as error:
        load_recipe(DEMO, ["memory.tiled_mlp=true", "distributed.fsdp=true"])
    assert any("memory.tiled_mlp" in problem for problem in error.value.problems)


def test_tiling_lowers_the_backward_peak_past_one_slice(calibrate):
    """Live tensors of two real training steps at 4,096 tokens (slices of 1,024): the recomputed layer's backward
    keeps the MLP intermediates of one slice instead of four. In float32: bfloat16 matmuls on a CPU without native
    bfloat16 are emulated, 6-200x slower (tools/calibrate_plan.py, QUICK), and the slice arithmetic is the same."""
    point = ("qwen2", 4096, 512, 2048, 1, 8, 2, 1024, "float32", 0.0)
    plain, tiled = calibrate.measure((*point, False)), calibrate.measure((*point, True))
    excess = {name: m["phase_peaks"]["backward"] - m["start_bytes"] for name, m in (("plain", plain), ("tiled", tiled))}
    assert excess["tiled"] < 0.6 * excess["plain"], excess
    assert abs(calibrate.error_of(tiled)) < 0.10, calibrate.describe(tiled)


def _tiny_lora_model(dropout: float):
    """A 2-layer Qwen2 in float64 with LoRA on every linear layer, checkpointed as in training."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=256)
    model = get_peft_model(Qwen2ForCausalLM(config).double(),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # nonzero B: every LoRA weight gets a gradient
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert tile_mlps(model, 8) == 2
    return model


def test_with_lora_dropout_the_gradients_are_those_of_the_loss():
    """The backward recomputes each slice: it must draw the forward's dropout masks, or the gradient belongs to a
    different loss. Checked against a central finite difference in float64."""
    model = _tiny_lora_model(dropout=0.3)
    ids = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(5))
    weight = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"]

    def loss():
        torch.manual_seed(1)  # the same dropout masks at every evaluation
        return model(input_ids=ids).logits.pow(2).mean()

    loss().backward()
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2), dtype=weight.dtype)
    with torch.no_grad():
        weight += 1e-5 * direction
        plus = loss().item()
        weight -= 2e-5 * direction
        minus = loss().item()
    # Within 2 %: Qwen2's norms compute in float32 even here; fresh masks in the backward miss by a factor of ~5.
    assert (weight.grad * direction).sum().item() == pytest.approx((plus - minus) / 2e-5, rel=2e-2)


def test_data_parallel_sees_each_gradient_once(tmp_path):
    """DDP allows one gradient per parameter and step: the per-slice gradients are summed and handed to autograd,
    not accumulated into .grad slice by slice (which DDP refuses: 'mark a variable ready only once')."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _tiny_lora_model(dropout=0.0)
        ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(3))
        parallel = torch.nn.parallel.DistributedDataParallel(model)
        parallel(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
