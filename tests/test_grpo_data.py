"""GRPO's recipe keys and rows: every problem reported before any weight loads, bad rows by their row number."""

from __future__ import annotations

import json

import pytest

from qlora_kit.data.checkable import checkable_row, load_checkable, normalize_answer, parse_number
from qlora_kit.errors import UserError
from qlora_kit.recipe.loading import recipe_from_dict
from qlora_kit.recipe.schema import DataSection


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_both_kinds_of_rows_are_read(tmp_path):
    path = write_rows(tmp_path, [
        {"question": "Which vitamin?", "options": ["A1", "B12", "C"], "answer": "C"},
        {"question": "Which vitamin?", "options": {"A": "A1", "B": "B12"}, "answer": 1},
        {"question": "5 times 12?", "answer": 60},
        {"question": "Capital of France?", "answer": "Paris"},
    ])
    rows = load_checkable(DataSection(source=str(path), shuffle=False, eval_rows=1), seed=0)
    assert [r.kind for r in rows.held_out + rows.train] == ["choice", "choice", "numeric", "exact"]
    first = rows.held_out[0]
    assert first.answer == "C" and first.letters == "ABC" and first.number == 1
    assert "A. A1\nB. B12\nC. C\n" in first.question and first.question.endswith("letter of the right option.")
    assert rows.train[0].answer == "B"
    assert rows.train[1].answer == "60"
    assert rows.kinds == {"choice": 2, "numeric": 1, "exact": 1}


def test_every_bad_row_is_named_by_its_line(tmp_path):
    path = write_rows(tmp_path, [
        {"question": "ok?", "answer": "yes"},
        {"question": "", "answer": "yes"},
        {"question": "no answer"},
        {"question": "letters?", "options": ["x", "y"], "answer": "E"},
        {"question": "one option", "options": ["x"], "answer": "A"},
        {"question": "no answer?", "answer": "  "},
    ])
    with pytest.raises(UserError) as error:
        load_checkable(DataSection(source=str(path)), seed=0)
    text = error.value.title + "\n" + "\n".join(error.value.problems)
    assert "5 of the 6 rows cannot be checked" in text
    assert "row 2" in text and "rows 3, 6" in text and "row 4" in text and "row 5" in text


def test_columns_follow_the_recipe_when_the_data_has_them(tmp_path):
    path = write_rows(tmp_path, [{"Question": "5 times 12?", "Response": "60"}])
    rows = load_checkable(DataSection(source=str(path)), seed=0)
    assert (rows.train[0].question, rows.train[0].answer, rows.train[0].kind) == ("5 times 12?", "60", "numeric")


def test_numbers_and_normalisation():
    assert parse_number("1,200") == 1200 and parse_number("-3.5") == -3.5 and parse_number("60.") == 60
    assert parse_number("60 mg") is None and parse_number("Paris") is None
    assert normalize_answer("  The   Answer. ") == "the answer"
    assert checkable_row({"question": "q", "answer": True}, 1, "question", "answer") != ""  # a bool is no answer
    assert isinstance(checkable_row({"question": "q", "answer": True}, 1, "question", "answer"), str)


def test_the_embedded_demo_rows_are_checkable():
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "qlora_kit" / "demo" / "grpo.jsonl"
    rows = load_checkable(DataSection(source=str(demo)), seed=0)
    assert rows.kinds["choice"] > 0 and rows.kinds["numeric"] > 0


def test_demo_rows_are_deterministic():
    from qlora_kit.demo.build import make_checkable_rows

    assert make_checkable_rows() == make_checkable_rows()
    from pathlib import Path

    shipped = (Path(__file__).resolve().parents[1] / "qlora_kit" / "demo" / "grpo.jsonl").read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_checkable_rows())


def problems(raw: dict) -> list[str]:
    with pytest.raises(UserError) as error:
        recipe_from_dict(raw)
    return error.value.problems


def test_recipe_problems_are_reported_all_at_once():
    found = problems({"train": {"method": "grpo", "batch_size": 3, "grad_accum": 1},
                      "grpo": {"rewards": {"formt": 1.0, "choice": "high"}, "num_generations": 4,
                               "max_completion_length": 4096},
                      "lora": {"target_modules": ["q_proj", "lm_head"]}})
    text = "\n".join(found)
    assert "did you mean `format`" in text
    assert "`grpo.rewards.choice` must be a number" in text
    assert "must be a multiple of grpo.num_generations" in text
    assert "leaves no room for the prompt" in text
    assert "lm_head" in text


def test_sft_only_switches_are_refused_for_grpo():
    text = "\n".join(problems({"train": {"method": "grpo", "eval_steps": 10}, "data": {"eval_rows": 4},
                              "memory": {"offload_activations": True, "tiled_mlp": True}}))
    assert "`memory.offload_activations` is an SFT switch" in text and "`memory.tiled_mlp` is an SFT switch" in text
    assert "`train.eval_steps` has no GRPO meaning" in text


def test_grpo_keys_and_their_ranges():
    text = "\n".join(problems({"train": {"method": "ppo"}, "grpo": {"num_generations": 1, "beta": -1.0}}))
    assert "`train.method` must be one of sft, grpo" in text
    assert "`grpo.num_generations` must be at least 2" in text and "`grpo.beta`" in text


def test_an_adapter_to_start_from_is_for_grpo_only():
    assert any("model.adapter" in p for p in problems({"model": {"adapter": "runs/medical"}}))
    recipe = recipe_from_dict({"model": {"adapter": "runs/medical"}, "train": {"method": "grpo"}})
    assert recipe.model.adapter == "runs/medical"  # resolved against the recipe's folder only when loaded from a file


def test_reward_files_are_resolved_from_the_recipe_folder(write_recipe, tmp_path):
    from qlora_kit.recipe.loading import load_recipe, recipe_to_toml

    path = write_recipe('[train]\nmethod = "grpo"\n[grpo.rewards]\nformat = 0.5\n"mine.py:score" = 1.0\n')
    recipe = load_recipe(path)
    assert recipe.grpo.rewards == {"format": 0.5, f"{tmp_path / 'mine.py'}:score": 1.0}
    assert load_recipe(write_recipe(recipe_to_toml(recipe), "again.toml")).grpo.rewards == recipe.grpo.rewards


def test_sft_recipes_are_unchanged_by_the_grpo_keys():
    from qlora_kit.recipe.schema import Recipe

    recipe = recipe_from_dict({})
    assert recipe == Recipe() and recipe.train.method == "sft" and recipe.model.adapter == ""


def test_bad_rows_stop_a_run_before_any_weight_loads(tmp_path):
    from conftest import REPO, run_cli

    path = write_rows(tmp_path, [{"question": "ok?", "answer": "1"}, {"question": "broken", "options": "AB",
                                                                      "answer": "A"}])
    result = run_cli(str(REPO / "recipes" / "demo_grpo.toml"), f"data.source={path}", f"output.dir={tmp_path / 'r'}",
                     "--dry-run")
    assert result.returncode == 2
    assert "row 2" in result.stdout + result.stderr
    assert not (tmp_path / "r" / "adapter").exists()


def test_dry_run_shows_the_prompts(tmp_path):
    from conftest import REPO, run_cli

    out = tmp_path / "r"
    result = run_cli(str(REPO / "recipes" / "demo_grpo.toml"), f"output.dir={out}", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    first = json.loads((out / "preview.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["prompt"].endswith("<think>\n") and first["checked_by"] in ("choice", "numeric")
    assert first["prompt_ids"].count(first["prompt_ids"][0]) == 1  # one BOS, not the template's and the tokenizer's
    assert "held-out rows" in result.stdout


def test_prompts_with_the_real_r1_tokenizer_have_one_bos_and_open_the_think_block(tmp_path, r1_tokenizer):
    """The R1 template writes BOS as text and ends inside <think>: the prompt ids must hold exactly one BOS (TRL's own
    tokenization would add a second), and the format reward must see the block as opened by the template."""
    from rich.console import Console

    from qlora_kit.data.checkable import build_grpo_examples

    path = write_rows(tmp_path, [{"question": "Which vitamin?", "options": ["A1", "B12", "C"], "answer": "C"},
                                 {"question": "5 times 12?", "answer": "60"}])
    recipe = recipe_from_dict({"data": {"source": str(path), "max_length": 512},
                               "train": {"method": "grpo"}, "grpo": {"max_completion_length": 256}})
    examples = build_grpo_examples(recipe, r1_tokenizer, Console(quiet=True))
    for prompted in examples.train:
        assert prompted.prompt_ids.count(r1_tokenizer.bos_token_id) == 1 and prompted.prompt_ids[0] == \
            r1_tokenizer.bos_token_id
        assert prompted.prompt.endswith("<think>\n")
    from qlora_kit.train.grpo import bos_to_add, tokenize_prompts  # what the trainer tokenizes: the same ids

    ids = tokenize_prompts(r1_tokenizer, bos_to_add(r1_tokenizer), [p.prompt for p in examples.train])
    assert ids == [p.prompt_ids for p in examples.train]
