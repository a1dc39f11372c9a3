"""The recipe: every shipped recipe parses, overrides are typed, and every problem is reported at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qlora_kit.errors import UserError
from qlora_kit.recipe.loading import load_recipe, recipe_from_dict, recipe_to_toml
from qlora_kit.recipe.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"demo.toml", "medical.toml", "medical_zh.toml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.lora.r >= 1
    first_comment = path.read_text(encoding="utf-8").splitlines()[:4]
    assert any("-m qlora_kit.run" in line for line in first_comment), "header must show the command"


def test_demo_recipe_points_at_shipped_files():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "demo.toml")
    assert Path(recipe.model.name, "config.json").is_file()
    assert Path(recipe.data.source).is_file()
    assert recipe.model.init == "random"


def test_overrides_are_typed_as_toml_literals():
    recipe = recipe_from_dict({}, ["train.max_steps=50", "train.learning_rate=1e-4", "lora.use_dora=true",
                                   "data.source=rows.jsonl", 'data.format="{question}|{response}"',
                                   'lora.target_modules=["q_proj", "v_proj"]', "train.epochs=2"])
    assert recipe.train.max_steps == 50
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.lora.use_dora is True
    assert recipe.data.source == "rows.jsonl"  # a bare word is taken as a string
    assert recipe.data.format == "{question}|{response}"
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.epochs == 2.0 and isinstance(recipe.train.epochs, float)


def test_a_bare_template_is_text_but_a_broken_list_is_an_error():
    # The seed tutorial's template, typed without TOML quotes: it starts with a brace but is meant as text.
    bare = recipe_from_dict({}, [r"data.format=诊断问题：{question}\n详细分析：{cot}\n### 答案：\n{response}"])
    # The shell stripped its quotes; `\n` still means a new line, as in the recipe file.
    assert bare.data.format == "诊断问题：{question}\n详细分析：{cot}\n### 答案：\n{response}"
    assert recipe_from_dict({}, ["data.source=C:\\new\\rows.jsonl"]).data.source == "C:\\new\\rows.jsonl"
    assert recipe_from_dict({}, ["data.format={question} ### {response}"]).data.format == "{question} ### {response}"
    with pytest.raises(UserError, match="1 problem") as caught:
        recipe_from_dict({}, ["lora.target_modules=[q_proj"])
    assert "takes a list" in caught.value.problems[0]
    # Bare words for a list are its items.
    assert recipe_from_dict({}, ["output.report_to=tensorboard"]).output.report_to == ["tensorboard"]
    assert recipe_from_dict({}, ["lora.target_modules=q_proj,v_proj"]).lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="`output.report_to` has 'tensorbord'.*did you mean `tensorboard`"):
        recipe_from_dict({}, ["output.report_to=tensorbord"])


def test_all_problems_reported_at_once_with_did_you_mean():
    raw = {"train": {"learning_rat": 1e-4, "batch_size": "4", "max_steps": -3},
           "lora": {"r": 0}, "quant": {"quant_type": "nf5"}, "modle": {"name": "x"}}
    with pytest.raises(UserError) as caught:
        recipe_from_dict(raw, ["nonsense"])
    text = caught.value.render()
    assert "5 problem" not in text  # count is exact below
    problems = caught.value.problems
    assert len(problems) == 7, problems
    assert "did you mean `train.learning_rate`" in text
    assert "`train.batch_size` must be a whole number" in text
    assert "`train.max_steps` must be 0 (use epochs) or more" in text
    assert "`lora.r` must be at least 1" in text
    assert "`quant.quant_type` must be one of nf4, fp4" in text
    assert "unknown section [modle] (did you mean `model`?)" in text
    assert "override `nonsense` must look like section.key=value" in text


def test_invalid_toml_names_line_and_column(write_recipe):
    path = write_recipe("[train]\nmax_steps = \n")
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert str(path) in caught.value.title and "line 2" in caught.value.title


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="Recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("template, message", [
    ("{response} only", "containing {question}"),
    ("{question} and nothing", "needs {cot} or {response}"),
    ("{question}{response}{cot}", "before {cot} before {response}"),
    ("{question}{cot}{oops}", "unknown placeholder(s) {oops}"),
    # The seed tutorial's own capitalised column names: the message says what the placeholders are.
    ("诊断问题：{Question}\n详细分析：{Complex_CoT}\n### 答案：\n{Response}",
     "unknown placeholder(s) {Complex_CoT}, {Question}, {Response}; the placeholders are {question}, {cot} and "
     "{response}"),
    ("{question}{cot}{", "unknown or broken placeholder"),
])
def test_bad_custom_formats(template, message):
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_from_dict({"data": {"format": template}})


def test_seed_tutorial_template_is_accepted():
    seed = "诊断问题：{question}\n详细分析：{cot}\n### 答案：\n{response}"
    assert recipe_from_dict({"data": {"format": seed}}).data.format == seed


def test_sft_passthrough_is_checked_against_sftconfig():
    assert recipe_from_dict({"sft": {"neftune_noise_alpha": 5}}).sft == {"neftune_noise_alpha": 5}
    with pytest.raises(UserError) as caught:
        recipe_from_dict({"sft": {"neftune_noise_alph": 5, "learning_rate": 1.0}})
    text = caught.value.render()
    assert "did you mean `sft.neftune_noise_alpha`" in text
    assert "`sft.learning_rate` is set by qlora_kit itself; use `train.learning_rate` instead" in text


@pytest.mark.parametrize("key, value, home", [
    # Each of these passed validation once, then crashed SFTConfig() with "got multiple values for keyword argument".
    ("report_to", "tensorboard", "use `output.report_to` instead"),
    ("eval_strategy", "epoch", "use `train.eval_steps` instead"),
    ("per_device_eval_batch_size", 2, "use `train.batch_size` instead"),
    ("disable_tqdm", False, "the live status view replaces the progress bar"),
])
def test_sft_passthrough_refuses_what_our_sftconfig_call_sets(key, value, home):
    with pytest.raises(UserError) as caught:
        recipe_from_dict({"sft": {key: value}})
    assert f"`sft.{key}` is set by qlora_kit itself" in caught.value.render()
    assert home in caught.value.render()


def test_every_argument_of_our_sftconfig_call_is_refused_in_sft():
    """The refused list is the call's own keyword arguments: building the config with any of them in [sft] would
    crash, so each must be refused before anything is written."""
    import torch

    from qlora_kit.model.loading import Precision
    from qlora_kit.recipe.trainer_arguments import sft_arguments, sft_keys_we_set
    from qlora_kit.train.fit import sft_config

    passed = set(sft_arguments(Recipe(), Precision("cpu", torch.float32), Path("/tmp/x")))
    assert passed <= sft_keys_we_set()
    assert {"report_to", "eval_strategy", "per_device_eval_batch_size", "disable_tqdm", "fsdp"} <= sft_keys_we_set()
    for key in sft_keys_we_set():
        with pytest.raises(UserError, match=re.escape(f"`sft.{key}` is set by qlora_kit itself")):
            recipe_from_dict({"sft": {key: 1}})
    # and what is accepted really reaches SFTConfig
    recipe = recipe_from_dict({"sft": {"neftune_noise_alpha": 5.0}})
    assert sft_config(recipe, Precision("cpu", torch.float32), Path("/tmp/x")).neftune_noise_alpha == 5.0


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, write_recipe):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    path = write_recipe('[data]\nsource = "rows.jsonl"\n[model]\nname = "org/some-model"\n')
    recipe = load_recipe(path)
    assert recipe.data.source == str(tmp_path / "rows.jsonl")
    assert recipe.model.name == "org/some-model"  # a hub id stays a hub id


def test_saved_recipe_round_trips(write_recipe):
    recipe = recipe_from_dict({"train": {"max_steps": 7}, "sft": {"neftune_noise_alpha": 5.0}},
                              ['data.format="Q: {question}\\nA: {response}"'])
    again = load_recipe(write_recipe(recipe_to_toml(recipe)))
    again.source_path = recipe.source_path
    assert again == recipe


def test_defaults_are_a_valid_recipe():
    assert recipe_from_dict({}) == Recipe()
