"""memory.tiled_mlp: the sequence-tiled MLP trains exactly like the plain one (same losses, same adapter), and lowers
the step's peak where it matters (past one slice)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, encode_for_training

from qlora_kit.encode import to_dataset
from qlora_kit.errors import UserError
from qlora_kit.model import add_lora, choose_precision, load_model
from qlora_kit.recipe import load_recipe
from qlora_kit.tiled_mlp import tile_mlps
from qlora_kit.train import build_trainer

DEMO = REPO / "recipes" / "demo.toml"


def train_demo(tmp_path, slice_tokens: int | None, steps: int = 4, overrides: tuple = ()):
    recipe = load_recipe(DEMO, [f"train.max_steps={steps}", "train.eval_steps=0", "data.eval_rows=0",
                                "train.logging_steps=1", "train.save_steps=0", f"output.dir={tmp_path}", *overrides])
    tokenizer, _, _, examples = encode_for_training(recipe)
    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora)
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
    model = add_lora(load_model(recipe, precision), recipe.lora)
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(examples), None, precision, tmp_path, [])
    tiled = [name for name, module in trainer.model.named_modules() if getattr(module, "_qlora_kit_tiled", False)]
    assert len(tiled) == 2 and all(name.endswith("mlp") for name in tiled)


def test_tiled_mlp_and_fsdp_are_refused_together():
    with pytest.raises(UserError) as error:
        load_recipe(DEMO, ["memory.tiled_mlp=true", "distributed.fsdp=true"])
    assert any("memory.tiled_mlp" in problem for problem in error.value.problems)


def test_tiling_lowers_the_backward_peak_past_one_slice(calibrate):
    """Live tensors of two real training steps at 4,096 tokens (slices of 1,024): the recomputed layer's backward
    keeps the MLP intermediates of one slice instead of four."""
    point = ("qwen2", 4096, 512, 2048, 1, 8, 2, 1024, "bfloat16", 0.0)
    plain, tiled = calibrate.measure((*point, False)), calibrate.measure((*point, True))
    excess = {name: m["phase_peaks"]["backward"] - m["start_bytes"] for name, m in (("plain", plain), ("tiled", tiled))}
    assert excess["tiled"] < 0.6 * excess["plain"], excess
    assert abs(calibrate.error_of(tiled)) < 0.10, calibrate.describe(tiled)
