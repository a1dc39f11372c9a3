"""The VRAM planner: exact weight and LoRA terms against a really loaded 4-bit model, the activation terms against
the live tensors of real training steps on CPU (tools/calibrate_plan.py), and sane behaviour of the rest
(monotone in length, the fit search, the CLI)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from qlora_kit.plan.architectures import ARCHITECTURES
from qlora_kit.plan.estimate import GIB, Architecture, estimate, lora_parameters, main, make_plan
from qlora_kit.recipe.loading import recipe_from_dict


@pytest.fixture(scope="module")
def mid_model_dir(tmp_path_factory):
    """Config-only Qwen2 big enough that the weights, not bitsandbytes' constant tables, dominate."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("mid-qwen2")
    Qwen2Config(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=576, tie_word_embeddings=False).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_and_lora_terms_match_a_loaded_model(mid_model_dir, double_quant):
    from qlora_kit.model.loading import add_lora, choose_precision, load_model

    recipe = recipe_from_dict({"model": {"name": str(mid_model_dir), "init": "random"},
                               "quant": {"double_quant": double_quant}, "lora": {"r": 8}})
    model = add_lora(load_model(recipe, choose_precision(recipe.quant)), recipe.lora, seed=recipe.train.seed)
    arch = Architecture.from_config(json.loads((mid_model_dir / "config.json").read_text()))
    planned = estimate(arch, recipe, device="cpu").terms  # fp32 on CPU

    quantized = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            quantized += param.numel() * param.element_size() + state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                quantized += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert planned["4-bit linear weights"] == pytest.approx(quantized, rel=0.01)

    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert lora == lora_parameters(arch, recipe)
    embeddings = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if "embed_tokens" in n or "lm_head" in n)
    assert planned["embeddings + lm_head (32-bit)"] == embeddings  # float32 on a CPU


PHASE_NAMES = {"backward": "recomputed layer + grads", "loss backward": "loss tiles (chunked, no full logits)"}


@pytest.mark.parametrize("which", [1, 2, 3], ids=["bf16-layer-peak", "bf16-lora-dropout", "fp32-loss-peak"])
def test_the_planner_matches_the_live_tensors_of_real_training_steps(calibrate, which):
    """Two real qlora_kit steps (NF4, LoRA r 32, TRL), every live tensor counted: the planner's `allocated` estimate
    must be within 10 % (the target) and must name the phase where the peak really was. Small shapes: see QUICK."""
    measured = calibrate.measure(calibrate.QUICK[which])
    assert abs(calibrate.error_of(measured)) < 0.10, calibrate.describe(measured)
    plan = calibrate.planned(calibrate.QUICK[which])
    peaks = measured["phase_peaks"]
    assert PHASE_NAMES[max(peaks, key=peaks.get)] == max(plan.phases, key=plan.phases.get)


def test_the_peak_is_the_largest_phase_not_the_sum_of_all():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-7b"], "7b")
    recipe = recipe_from_dict({})
    for length in (256, 4096, 16384):
        est = estimate(arch, recipe, length, 1)
        static = sum(v for k, v in est.terms.items() if k in ("4-bit linear weights", "embeddings + lm_head (16-bit)",
                                                              "norms + biases", "LoRA weights (fp32)",
                                                              "optimizer state"))
        assert est.allocated == pytest.approx(static + max(est.phases.values()))
        assert est.allocated < static + sum(est.phases.values())


def test_the_recipe_s_compute_dtype_and_gradient_accumulation_count():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-1.5b"], "1.5b")
    sizes = {dtype: estimate(arch, recipe_from_dict({"quant": {"compute_dtype": dtype}})).allocated
             for dtype in ("auto", "bfloat16", "float16", "float32")}
    assert sizes["auto"] == sizes["bfloat16"] == sizes["float16"] < sizes["float32"]
    one, eight = (estimate(arch, recipe_from_dict({"train": {"grad_accum": n}})) for n in (1, 8))
    lora_grads = lora_parameters(arch, recipe_from_dict({})) * 4
    per_layer = lora_grads / arch.layers  # without accumulation the backward peak holds one layer's gradients
    assert eight.allocated - one.allocated == pytest.approx(lora_grads - per_layer)


def test_cpu_steps_add_trl_s_torch_loss_copies_and_no_gpu_terms():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-1.5b"], "1.5b")
    recipe = recipe_from_dict({})
    gpu, cpu = estimate(arch, recipe, 4096, 1), estimate(arch, recipe, 4096, 1, device="cpu")
    loss = "loss tiles (chunked, no full logits)"
    assert cpu.phases[loss] > gpu.phases[loss] * 2  # float32, and ~7 float32 copies of each tile without Triton
    assert cpu.terms["CUDA context"] == cpu.terms["allocator slack"] == 0 < gpu.terms["CUDA context"]
    assert cpu.terms["optimizer state"] == 4 * gpu.terms["optimizer state"]  # AdamW on CPU, 8-bit AdamW on CUDA


def test_estimate_grows_with_length_and_the_fit_search_is_consistent():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-1.5b"], "1.5b")
    recipe = recipe_from_dict({})
    sizes = [estimate(arch, recipe, n, 1).total for n in (512, 1024, 2048, 4096)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    plan = make_plan(arch, recipe, 8.0)
    assert plan.fits and plan.max_length_fit > recipe.data.max_length
    assert estimate(arch, recipe, plan.max_length_fit, 1).total / GIB <= plan.budget_gib
    assert estimate(arch, recipe, plan.max_length_fit + 16, 1).total / GIB > plan.budget_gib


SWITCHES = ("offload_activations", "embeddings_on_cpu", "tiled_mlp")


def with_switches(max_length: int, *switches: str):
    return recipe_from_dict({"data": {"max_length": max_length}, "memory": dict.fromkeys(switches, True)})


def test_a_plan_that_does_not_fit_names_the_knob():
    arch = Architecture.from_config(ARCHITECTURES["r1-distill-qwen-7b"], "7b")
    plan = make_plan(arch, recipe_from_dict({"data": {"max_length": 16384}}), 8.0)
    assert not plan.fits and plan.suggestion.startswith(f"data.max_length={plan.max_length_fit} ")
    # ... and, since the [memory] switches are off, how far they would go (every row kept up to there).
    every = "memory.tiled_mlp=true memory.offload_activations=true memory.embeddings_on_cpu=true"
    assert f"or {every} data.max_length=" in plan.suggestion
    longer = int(plan.suggestion.split("data.max_length=")[2].split()[0])
    assert longer > plan.max_length_fit and make_plan(arch, with_switches(longer, *SWITCHES), 8.0).fits
    # Where some switches suffice, the fewest are named, and each of them is needed.
    at_2048 = make_plan(arch, recipe_from_dict({"data": {"max_length": 2048}}), 8.0)
    named = [part.split(".")[1].split("=")[0] for part in at_2048.suggestion.split(" (then about ")[0].split()]
    assert not at_2048.fits and named and make_plan(arch, with_switches(2048, *named), 8.0).fits
    for dropped in named:
        assert not make_plan(arch, with_switches(2048, *(n for n in named if n != dropped)), 8.0).fits
    all_on = make_plan(arch, with_switches(32768, *SWITCHES), 8.0)
    assert all_on.suggestion.startswith("data.max_length=") and "memory." not in all_on.suggestion
    # A length that would drop every reasoning row is no advice.
    squeezed = make_plan(arch, recipe_from_dict({"data": {"max_length": 2048}}), 6.0)
    assert squeezed.suggestion.startswith("does not fit at a useful length"), squeezed.suggestion
    small_batches = make_plan(Architecture.from_config(ARCHITECTURES["r1-distill-qwen-1.5b"]),
                              recipe_from_dict({"train": {"batch_size": 64}}), 8.0)
    assert "train.batch_size=" in small_batches.suggestion and "train.grad_accum=" in small_batches.suggestion
    for batch, accum in ((64, 8), (8, 1), (6, 3)):  # the effective batch stays exactly batch x accum
        plan = make_plan(Architecture.from_config(ARCHITECTURES["r1-distill-qwen-1.5b"]), recipe_from_dict(
            {"train": {"batch_size": batch, "grad_accum": accum}, "data": {"max_length": 4096}}), 8.0)
        knobs = dict(part.split("=") for part in plan.suggestion.split(" (")[0].split())
        assert int(knobs["train.batch_size"]) * int(knobs["train.grad_accum"]) == batch * accum, plan.suggestion
    big_batch = make_plan(arch, recipe_from_dict({"train": {"batch_size": 4}, "data": {"max_length": 4096}}), 8.0)
    assert big_batch.suggestion.startswith("train.batch_size=1 train.grad_accum=32 and ")  # the figures are at 1


def test_cli_json(capsys):
    assert main([str(REPO / "recipes" / "demo.toml"), "--json", "--vram-gib", "8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"peak_gib", "fits", "max_length_fit", "terms_gib"} <= plan.keys()
    assert plan["fits"] is True


def test_cli_exits_1_when_the_run_does_not_fit_and_explains_its_figures(tmp_path, capsys):
    recipe = tmp_path / "r.toml"  # the 7B in 16 bits at 4,096 tokens on a 6 GiB card: cannot fit
    recipe.write_text('[model]\nname = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"\n[quant]\nload_in_4bit = false\n'
                      '[data]\nmax_length = 4096\n')
    assert main([str(recipe), "--json", "--vram-gib", "6"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["reserved_gib"] < plan["peak_gib"]
    assert "CUDA context" in plan["about"]["reserved_gib"]
    assert main([str(recipe), "--vram-gib", "6"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_the_plan_title_keeps_a_long_model_path_on_one_line(tmp_path):
    import io

    from rich.console import Console

    from qlora_kit.plan.estimate import print_plan, read_architecture
    from qlora_kit.recipe.loading import load_recipe

    recipe = load_recipe(REPO / "recipes" / "demo.toml")
    plan = make_plan(read_architecture(recipe.model), recipe, 8.0)
    plan.model = "/home/someone/a/rather/long/path/to/models/DeepSeek-R1-Distill-Qwen-1.5B-local-copy"
    console = Console(file=io.StringIO(), width=80)
    print_plan(plan, console)
    assert f"VRAM plan: {plan.model}, " in console.file.getvalue()


def test_cli_reports_a_missing_model_folder(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nname = "{tmp_path / "nowhere"}"\n')
    assert main([str(recipe)]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing left after the desktop's share: an argument error, not a plan
        main([str(REPO / "recipes" / "demo.toml"), "--vram-gib", "0.3"])
    assert "--gpu must be more than" in capsys.readouterr().err




@pytest.mark.parametrize("model_id, hidden, layers", [("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 3584, 28),
                                                      ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 4096, 32),
                                                      ("someone/deepseek-r1-distill-qwen-1.5b", 1536, 28)])
def test_target_models_are_planned_offline_from_their_built_in_configs(model_id, hidden, layers):
    from qlora_kit.plan.estimate import read_architecture
    from qlora_kit.recipe.schema import ModelSection

    arch = read_architecture(ModelSection(name=model_id))  # HF_HUB_OFFLINE=1 (conftest): no download possible
    assert (arch.hidden, arch.layers) == (hidden, layers)


def test_a_length_bounded_by_the_context_says_so():
    from qlora_kit.plan.estimate import read_architecture
    from qlora_kit.recipe.loading import load_recipe

    recipe = load_recipe(REPO / "recipes" / "demo.toml")
    arch = read_architecture(recipe.model)
    tiny = make_plan(arch, recipe, 8.0)  # a tiny model: memory would allow far more than its context
    assert tiny.context_bound and tiny.max_length_fit == arch.max_positions
    big = make_plan(Architecture.from_config(ARCHITECTURES["r1-distill-qwen-7b"], "7b"), recipe, 8.0)
    assert not big.context_bound and 0 < big.max_length_fit < 131072
