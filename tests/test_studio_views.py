"""What the studio's pages show, read from files without a browser: the live charts and the GGUF advice."""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("gradio", reason="the studio needs the studio extra: pip install -e '.[studio]'")

from qlora_kit.studio import charts  # noqa: E402
from qlora_kit.studio.views import gguf_advice  # noqa: E402

TITLES = {"loss": "Loss", "memory": "Memory", "speed": "Tokens per second", "lr": "Learning rate"}


def polyline_points(svg: str, series: str) -> list[tuple[float, float]]:
    found = re.search(rf"<polyline [^>]*points='([^']*)' data-series='{re.escape(series)}'", svg)
    assert found, f"no line for {series}"
    return [tuple(map(float, pair.split(","))) for pair in found.group(1).split()]


def test_the_charts_draw_every_logged_point_of_each_series():
    records = [{"step": 0, "eval_loss": 3.0}]
    records += [{"step": s, "loss": 4.0 - s / 10, "learning_rate": 1e-3 * s / 10, "tokens_per_s": 900 + s,
                 "ram_used_gib": 0.5, "ram_peak_gib": 0.6} for s in range(2, 22, 2)]
    records += [{"step": 20, "eval_loss": 2.0}]
    page = charts.run_charts(records, TITLES)
    loss = polyline_points(page, "train")
    assert len(loss) == 10
    # Higher loss is drawn higher (smaller y), later steps further right.
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(loss, loss[1:], strict=False))
    assert len(polyline_points(page, "eval")) == 2
    assert len(polyline_points(page, "ram used")) == len(polyline_points(page, "ram peak")) == 10
    assert re.search(r"id='loss-chart' data-points='12'", page)
    # Each series names its last value, as a hover tooltip would.
    assert "train 2" in page and "eval 2" in page and "tokens/s 920" in page and "learning rate 2.0e-03" in page


def test_a_chart_without_points_says_so_and_a_single_point_is_a_dot():
    empty = charts.run_charts([], TITLES)
    assert empty.count("no points yet") == 4
    one = charts.line_chart("Loss", {"train": [(0, 1.5)], "eval": []})
    assert "<circle" in one and "data-points='1'" in one and "eval" not in one


def test_a_long_run_is_thinned_but_keeps_its_last_point_and_not_a_number_is_left_out():
    points = [(float(s), math.sin(s / 50)) for s in range(5001)]
    points[17] = (17.0, float("nan"))
    thinned = charts.thin([p for p in points if math.isfinite(p[1])])
    assert len(thinned) <= charts.MAX_POINTS + 1
    assert thinned[-1] == points[-1]
    svg = charts.line_chart("x", {"s": points})
    assert "nan" not in svg.lower()


@pytest.mark.parametrize(("span", "step"), [(1.0, 0.5), (0.003, 0.001), (7.3, 2.0), (130.0, 50.0), (0.0, 1.0)])
def test_ticks_are_round_numbers(span, step):
    assert charts.nice_step(span) == pytest.approx(step)


def test_the_gguf_advice_is_there_before_the_merge_and_names_a_type_not_a_script(tmp_path):
    from qlora_kit.recipe.loading import recipe_from_dict, recipe_to_dict
    from qlora_kit.studio.app import demo_raw
    from qlora_kit.studio.form import raw_to_toml

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    recipe = recipe_from_dict(demo_raw(), where="the demo")
    (run / "recipe.toml").write_text(raw_to_toml(recipe_to_dict(recipe)), encoding="utf-8")
    advice = gguf_advice(run)
    # The demo's config.json names no `architectures`, only model_type = qwen2: still sized, before any merge.
    assert "q4_k_m" in advice and "q8_0" in advice and "card" in advice
    assert advice.splitlines()[-1].strip().startswith("for an 8 GB card:")
    assert "export_gguf.py" not in advice and "python" not in advice


def test_the_advice_for_a_hub_model_comes_from_its_published_config_offline(tmp_path):
    from qlora_kit.recipe.loading import recipe_from_dict, recipe_to_dict
    from qlora_kit.studio.form import raw_to_toml

    run = tmp_path / "run"
    run.mkdir()
    recipe = recipe_from_dict({"model": {"name": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
                               "data": {"source": "data.jsonl"}}, where="a test")
    (run / "recipe.toml").write_text(raw_to_toml(recipe_to_dict(recipe)), encoding="utf-8")
    advice = gguf_advice(run)
    assert re.search(r"q4_k_m\s+4\.68 GB file", advice)
    assert advice.splitlines()[-1].strip() == "for an 8 GB card: q6_k"


def test_an_architecture_the_export_does_not_write_gets_no_size_lines():
    from qlora_kit.plan.gguf_sizes import advice_lines, architecture

    assert architecture({"model_type": "qwen2"}) == "Qwen2ForCausalLM"
    assert architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    assert architecture({"model_type": "gemma"}) is None
    assert architecture({"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]}) is None
    assert advice_lines({"model_type": "mistral"}, "x") == []


def test_the_charts_speak_the_pages_language():
    from qlora_kit.studio.app import chart_titles

    chinese = charts.run_charts([], chart_titles("zh"))
    assert chinese.count("还没有数据点") == 4 and "损失" in chinese and "no points" not in chinese
    drawn = charts.run_charts([{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}], chart_titles("zh"))
    assert ">步</text>" in drawn


def test_the_status_line_reads_a_runs_planned_steps_again_only_when_its_recipe_changes(tmp_path):
    import os

    from qlora_kit.studio.views import planned_steps

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[data]\nsource = "d.jsonl"\n[train]\nmax_steps = 200\n', encoding="utf-8")
    os.utime(recipe, ns=(1_000_000_000, 1_000_000_000))
    assert planned_steps(recipe) == 200
    recipe.write_text('[data]\nsource = "d.jsonl"\n[train]\nmax_steps = 7\n', encoding="utf-8")
    os.utime(recipe, ns=(2_000_000_000, 2_000_000_000))
    assert planned_steps(recipe) == 7
    assert planned_steps(tmp_path / "missing.toml") == 0


def test_a_preference_run_gets_its_rewards_and_accuracy_charts_and_sft_does_not():
    records = [{"step": s, "loss": 0.69 - s / 100, "rewards/chosen": s / 100, "rewards/rejected": -s / 50,
                "rewards/margins": 3 * s / 100, "rewards/accuracies": min(1.0, 0.5 + s / 40)} for s in range(2, 22, 2)]
    page = charts.run_charts(records, {**TITLES, "rewards": "Rewards", "accuracy": "Accuracy"})
    assert "id='rewards-chart' data-points='30'" in page and "id='accuracy-chart' data-points='10'" in page
    chosen, rejected = polyline_points(page, "chosen"), polyline_points(page, "rejected")
    # chosen rises and rejected falls: drawn going up (smaller y) and down
    assert chosen[-1][1] < chosen[0][1] and rejected[-1][1] > rejected[0][1]
    assert "margin 0.6" in page and "chosen ahead 1" in page
    assert "rewards-chart" not in charts.run_charts([{"step": 2, "loss": 1.0}], TITLES)


def test_the_pair_preview_colours_prompt_chosen_and_rejected():
    from qlora_kit.studio.views import pair_preview_html

    rows = [{"row": 3, "prompt": "<q>2+2?</q>", "prompt_ids": [1, 2, 3], "chosen": "<think>2+2</think>4",
             "chosen_ids": [4, 5], "rejected": "5", "rejected_ids": [6]},
            {"row": 4, "prompt": "p", "prompt_ids": [1], "completion": "bad", "completion_ids": [7], "label": False}]
    html_text = pair_preview_html(rows)
    assert re.search(r"<span class='tok-chosen'>&lt;think&gt;2\+2&lt;/think&gt;4</span>", html_text)
    assert "<span class='tok-rejected'>5</span>" in html_text and html_text.count("tok-prompt") == 3
    assert "row 3: prompt 3 tokens" in html_text and "chosen: 2 tokens" in html_text
    assert "undesirable: 1 tokens" in html_text and "<span class='tok-rejected'>bad</span>" in html_text


def test_the_results_of_a_preference_run_say_before_and_after():
    from qlora_kit.studio.views import results_markdown

    text = results_markdown({"steps": 30, "wall_time_s": 40.0, "method": "dpo", "pref_judged_rows": 16,
                             "pref_judged_from": "held-out rows (not trained on)", "pref_accuracy_before": 0.375,
                             "pref_accuracy_after": 1.0, "pref_logp_margin_before": -0.1,
                             "pref_logp_margin_after": 0.9, "tokens_per_s": 100})
    assert "DPO judged on 16 held-out rows" in text
    assert "prefers chosen (log-probability per token): 38% before -> 100% after" in text


@pytest.mark.parametrize(("builder", "recipe_file"), [("demo_raw", "demo.toml"), ("demo_dpo_raw", "demo_dpo.toml")])
def test_the_studio_demos_are_the_recipes_of_the_same_name(builder, recipe_file):
    """The page builds its demos (a fresh workspace has no recipes/): they must not drift from the recipes."""
    from pathlib import Path

    from qlora_kit.recipe.loading import load_recipe, recipe_from_dict, recipe_to_dict
    from qlora_kit.studio import app

    built = recipe_to_dict(recipe_from_dict(getattr(app, builder)(), where="the demo"))
    written = recipe_to_dict(load_recipe(Path(__file__).parents[1] / "recipes" / recipe_file))
    for raw in (built, written):  # the same files, named from two places
        raw["model"]["name"] = Path(raw["model"]["name"]).name
        raw["data"]["source"] = Path(raw["data"]["source"]).name
    assert built == written
