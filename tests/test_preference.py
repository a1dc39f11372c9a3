"""Preference tuning end to end, for real (TRL's DPOTrainer / KTOTrainer / ORPOTrainer, 4-bit NF4 through
bitsandbytes, LoRA), on the demo's tiny model, by the command a user types: held-out preference accuracy rises on a
learnable task, a resumed run repeats the uninterrupted one, the demo recipe finishes, a run can start from an SFT
run's adapter; and before any weight loads, every bad row is named by its line, and each side is rendered exactly
as SFT renders a completion."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from qlora_kit.errors import UserError


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def records_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo_dpo(tmp_path_factory):
    """recipes/demo_dpo.toml, as its header says to run it (CI runs the same)."""
    out = tmp_path_factory.mktemp("demo_dpo") / "run"
    result = run_cli("recipes/demo_dpo.toml", f"output.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_held_out_preference_accuracy_rises_in_the_demo(demo_dpo):
    """The learnable task: chosen sides reason then answer, rejected ones answer at once. After 30 steps the tuned
    model ranks the chosen side higher (per token) on at least 30 points more of the 16 held-out pairs than the
    base did, and DPO's implicit reward puts the chosen side ahead on at least 90 % of them."""
    out, stdout = demo_dpo
    summary = summary_of(out)
    assert summary["method"] == "dpo" and summary["pref_judged_rows"] == 16
    assert summary["pref_accuracy_after"] >= summary["pref_accuracy_before"] + 0.30, summary
    assert summary["pref_reward_accuracy"] >= 0.9 and summary["pref_reward_margin"] > 0
    assert summary["pref_logp_margin_after"] > summary["pref_logp_margin_before"]
    assert summary["train_rewards_margins_last"] > summary["train_rewards_margins_first"]
    assert "before -> after" in stdout and "prefers chosen" in stdout


def test_the_run_directory_of_a_dpo_run(demo_dpo):
    """The adapter alone (no reference copy), the curves, TRL's rewards in metrics.jsonl, the report's section."""
    from safetensors.torch import load_file

    out, stdout = demo_dpo
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and not any(".ref." in name for name in weights)
    assert (out / "reward_curve.png").is_file() and (out / "loss_curve.png").is_file()
    logged = [r for r in records_of(out) if "loss" in r]
    assert all("rewards/margins" in r and "rewards/accuracies" in r for r in logged)
    assert "margin" in stdout and "chosen ahead" in stdout  # the live view's preference line
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "prefers chosen" in report and "reward_curve.png" in report
    assert "eval_loss_before" not in summary_of(out)  # no SFT eval keys left empty in a preference run


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_run_the_demo_pairs(tmp_path, method):
    out = tmp_path / method
    result = run_cli("recipes/demo_dpo.toml", f"output.dir={out}", f"train.method={method}", "train.max_steps=4",
                     "samples.count=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summary_of(out)
    assert summary["method"] == method and summary["steps"] == 4
    key = "pref_label_accuracy" if method == "kto" else "pref_accuracy_after"
    assert key in summary, summary
    if method == "orpo":
        assert "pref_reward_accuracy" not in summary  # no reference to hold a reward against


def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    """Stopped at step 4 by a real torch.OutOfMemoryError (checkpoint at step 3) and resumed by the same command:
    every step's loss equals the uninterrupted run's within 1e-5."""
    from qlora_kit.errors import EXIT_OUT_OF_MEMORY
    from qlora_kit.train.interrupts import FAULT_OOM_ENV

    common = ["recipes/demo_dpo.toml", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
              "samples.count=0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(*common, f"output.dir={whole}").returncode == 0
    stopped = run_cli(*common, f"output.dir={parts}", env={FAULT_OOM_ENV: "4"})
    assert stopped.returncode == EXIT_OUT_OF_MEMORY, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    resumed = run_cli(*common, f"output.dir={parts}")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]

    def losses(out):
        return {r["step"]: r["loss"] for r in records_of(out) if "loss" in r}

    expected, got = losses(whole), losses(parts)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_dpo_from_an_sft_run_holds_the_model_to_that_sft_model(tmp_path):
    """model.adapter = an SFT run: the adapter trained further, the reference TRL's frozen copy of it ("ref"), and
    before training the policy equals the reference (the first step's loss is log 2, its margins 0)."""
    sft = tmp_path / "sft"
    result = run_cli("recipes/demo.toml", f"output.dir={sft}", "train.max_steps=3", "data.eval_rows=0",
                     "samples.count=0", "train.eval_steps=0")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "dpo"
    result = run_cli("recipes/demo_dpo.toml", f"output.dir={out}", f"model.adapter={sft}", "train.max_steps=2",
                     "samples.count=0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the SFT adapter it starts from" in summary_of(out)["reference"]
    first = next(r for r in records_of(out) if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and first["rewards/margins"] == pytest.approx(0, abs=1e-4)


# ------------------------------------------------------------------------------------------ rows, before any weight


def pairs_file(tmp_path, rows: list) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


GOOD = {"prompt": "Is 39.8 °C a fever?", "chosen": "<think>\n39.8 is above 38.0.\n</think>\n\nYes.", "rejected": "No."}


def test_every_bad_row_is_named_by_its_line(tmp_path):
    from qlora_kit.data.pairs import load_preference_rows
    from qlora_kit.recipe.schema import DataSection

    rows = [GOOD, {"prompt": "q", "chosen": "a"}, {**GOOD, "rejected": GOOD["chosen"]}, {**GOOD, "chosen": ""},
            {"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "answer": "a"},
            {**GOOD, "chosen": "<think>all thought</think>   "}, {"prompt": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"},
                                                                     {"role": "user", "content": "c"}],
                                                          "chosen": "x", "rejected": "y"}]
    with pytest.raises(UserError) as caught:
        load_preference_rows(DataSection(source=pairs_file(tmp_path, rows), shuffle=False), "dpo", 0)
    text = "\n".join(caught.value.problems)
    assert "7 of the 8 rows" in caught.value.title
    for line, words in [(2, "`rejected` is missing"), (3, "the same as `rejected`"), (4, "`chosen` has an empty"),
                        (5, "DPO needs pairs"), (6, "no `chosen` + `rejected`"), (7, "empty answer (after"),
                        (8, "multi-turn")]:
        assert any(words in d and d.rstrip().endswith(f"row {line}") for d in caught.value.problems), (line, text)


def test_kto_reads_rated_answers_and_unpairs_pairs(tmp_path, tiny_model_dir):
    from rich.console import Console

    from qlora_kit.data.pairs import RatedExample, build_preference_examples
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.recipe.loading import recipe_from_dict

    source = pairs_file(tmp_path, [GOOD, {"prompt": "q?", "completion": "a.", "label": False}] * 3)
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}, "data": {"source": source, "shuffle": False},
                               "train": {"method": "kto", "batch_size": 2}})
    examples = build_preference_examples(recipe, load_tokenizer(recipe.model), Console(quiet=True))
    assert all(isinstance(e, RatedExample) for e in examples.train)
    assert [e.label for e in examples.train] == [True, False, False] * 3  # each pair: a good and a bad answer


def test_each_side_is_rendered_as_sft_renders_a_completion(tmp_path, demo_tokenizer, tiny_model_dir):
    """Token by token: the prompt is the SFT prompt (one BOS, the chat template's generation prompt), each side the
    SFT completion of that reasoning and answer (one <think>, EOS as the last id); the masks TRL builds from them
    put the loss on each side exactly."""
    from rich.console import Console

    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.pairs import build_preference_examples
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import Row
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.recipe.loading import recipe_from_dict

    chat = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": GOOD["prompt"]}],
            "chosen": [{"role": "assistant", "content": GOOD["chosen"]}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)},
                               "data": {"source": pairs_file(tmp_path, [GOOD, chat]), "shuffle": False},
                               "train": {"method": "dpo"}})
    tokenizer = load_tokenizer(recipe.model)
    examples = build_preference_examples(recipe, tokenizer, Console(quiet=True))
    renderer, _ = make_renderer(tokenizer, recipe.data)
    encoder = Encoder(tokenizer, renderer)
    for example, system in zip(examples.train, ["", "Be brief."], strict=True):
        for ids, (cot, answer) in ((example.chosen_ids, ("39.8 is above 38.0.", "Yes.")),
                                   (example.rejected_ids, ("", "No."))):
            sft = encoder.encode(Row(GOOD["prompt"], cot, answer, 1, system))
            assert example.prompt_ids == sft.input_ids[:sft.prompt_length]
            assert ids == sft.input_ids[sft.prompt_length:]
            assert ids[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(example.prompt_ids + ids)
            assert text.count("<think>") == 1 and text.count("</think>") == 1
        assert example.prompt_ids.count(tokenizer.bos_token_id) == 1
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([examples.train[0].fields()])
    first = examples.train[0]
    assert batch["completion_mask"][0].tolist()[:len(first.prompt_ids) + len(first.chosen_ids)] == \
        [0] * len(first.prompt_ids) + [1] * len(first.chosen_ids)


def test_the_real_r1_template_renders_one_think_block(tmp_path, r1_tokenizer):
    """The R1 template opens the think block itself: each side then starts inside it, as SFT's completion does."""
    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.pairs import preference_row
    from qlora_kit.data.render import make_renderer
    from qlora_kit.recipe.schema import DataSection

    row = preference_row(GOOD, 1)
    encoder = Encoder(r1_tokenizer, make_renderer(r1_tokenizer, DataSection())[0])
    for side in (row.chosen, row.rejected):
        example = encoder.encode(row.row(side))
        text = r1_tokenizer.decode(example.input_ids)
        assert text.count("<think>") == 1 and text.count("</think>") == 1
        assert example.input_ids[-1] == r1_tokenizer.eos_token_id


def test_pref_keys_are_checked_with_the_recipe():
    from qlora_kit.recipe.loading import recipe_from_dict

    with pytest.raises(UserError) as caught:
        recipe_from_dict({"train": {"method": "kto"},
                          "pref": {"loss_type": "ipo", "beta": 0, "extra": {"beta": 1, "labl_smoothing": 2}}})
    text = "\n".join(caught.value.problems)
    assert "`pref.loss_type` must be auto or one of kto, apo_zero_unpaired" in text
    assert "`pref.beta` must be greater than 0" in text
    assert "`pref.extra.beta` is set by qlora_kit itself; use `pref.beta` instead" in text
    assert "unknown KTOConfig argument `pref.extra.labl_smoothing`" in text
    with pytest.raises(UserError, match="ORPO uses no reference"):
        recipe_from_dict({"train": {"method": "orpo"}, "pref": {"precompute_ref_log_probs": True}})
