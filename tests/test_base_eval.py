"""The honest "before": a 4-bit run's eval loss counted from the 16-bit base the user started from, with the NF4 base
beside it as what quantization cost (measured end to end in test_pipeline's demo run; here each view's arithmetic and
words, from hand-made metrics, and the cases where the 16-bit base cannot be measured)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_kit.train.artifacts import summarize
from qlora_kit.train.base_eval import NOT_MEASURED, StartingPoints, evaluate_16bit_base
from qlora_kit.train.status import StatusCallback
from qlora_kit.train.summary import outcome_lines

SIXTEEN = {"step": 0, "base_16bit_eval_loss": 2.6045, "base_16bit_eval_answer_loss": 2.1,
           "base_16bit_eval_reasoning_loss": 2.7, "base_16bit_eval_rows": 24}
NF4 = {"step": 0, "time_s": 0.0, "eval_loss": 2.8947, "eval_answer_loss": 2.4, "eval_reasoning_loss": 3.0,
       "eval_rows": 24}
TRAINED = [{"step": 4, "time_s": 10.0, "loss": 2.5, "num_tokens": 4000},
           {"step": 4, "time_s": 11.0, "eval_loss": 2.5629, "eval_answer_loss": 2.0, "eval_reasoning_loss": 2.65,
            "eval_rows": 24, "eval_runtime": 1.0}]


def summary_of(records, quantized=True):
    return summarize(records, steps=4, train_rows=100, trainable=1000, weights="pretrained", quantized=quantized)


def test_the_gain_is_counted_from_the_16_bit_base():
    s = summary_of([SIXTEEN, NF4, *TRAINED])
    assert (s["eval_loss_before"], s["eval_loss_nf4_base"], s["final_eval_loss"]) == (2.6045, 2.8947, 2.5629)
    assert s["eval_answer_loss_before"] == 2.1 and s["eval_answer_loss_nf4_base"] == 2.4
    assert "eval_before_note" not in s
    lines = outcome_lines(s)
    assert lines[0] == "eval loss 16-bit base 2.6045 → 2.5629 trained on 24 held-out rows"
    assert "answer tokens 2.1000 → 2.0000" in lines[1]
    assert lines[2] == ("  NF4 base (the 4-bit model training starts from) 2.8947: 4-bit storage cost +0.2902, which "
                        "training wins back first")


def test_a_16_bit_base_that_could_not_be_measured_is_said_so_not_replaced_by_the_nf4_figure():
    skipped = {"step": 0, NOT_MEASURED: "not measured: the 16-bit base needs about 18.3 GiB of GPU memory and 7.6 "
                                        "GiB is free"}
    s = summary_of([skipped, NF4, *TRAINED])
    assert s["eval_loss_before"] is None and s["eval_loss_nf4_base"] == 2.8947
    assert s["eval_before_note"].startswith("16-bit base not measured: the 16-bit base needs about 18.3 GiB")
    lines = outcome_lines(s)
    assert lines[0] == "eval loss 2.5629 trained on 24 held-out rows"
    assert "  NF4 base (the 4-bit model training starts from) 2.8947" in lines
    assert f"  {s['eval_before_note']}" in lines


def test_a_16_bit_lora_run_starts_from_its_own_step_0_eval():
    s = summary_of([NF4, *TRAINED], quantized=False)
    assert s["eval_loss_before"] == 2.8947 and "eval_loss_nf4_base" not in s
    start = StartingPoints.from_records([NF4], quantized=False)
    assert start.sixteen_bit["eval_loss"] == 2.8947 and start.nf4 == {} and start.quantization_cost() is None


def test_the_studio_results_read_the_same_lines():
    from qlora_kit.studio.views import results_markdown

    text = results_markdown({"steps": 4, "wall_time_s": 11.0, **summary_of([SIXTEEN, NF4, *TRAINED])})
    assert "**eval loss 16-bit base 2.6045 → 2.5629 trained on 24 held-out rows**" in text
    assert "NF4 base (the 4-bit model training starts from) 2.8947: 4-bit storage cost +0.2902" in text


def drive(callback: StatusCallback, logs: list[dict]) -> None:
    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=4)
    callback.on_train_begin(args, state, control)
    for step, entry in logs:
        state.global_step = step
        callback.on_log(args, state, control, logs=entry)


def test_the_live_view_counts_from_the_16_bit_base_and_shows_the_nf4_base():
    out = io.StringIO()
    callback = StatusCallback("t", Console(file=out, width=300), live=False, quantized=True,
                              start=StartingPoints.from_records([SIXTEEN], quantized=True))
    drive(callback, [(0, {k: v for k, v in NF4.items() if k.startswith("eval")}),
                     (4, {"eval_loss": 2.5629, "eval_answer_loss": 2.0})])
    _, before, now = out.getvalue().splitlines()
    assert before == ("eval loss before training: 16-bit base 2.6045 (answer 2.1000), NF4 base 2.8947 (answer 2.4000) "
                      "(4-bit storage +0.2902)")
    assert now == "step 4/4 | eval loss 2.6045 → 2.5629 (answer 2.1000 → 2.0000) · NF4 base 2.8947"


def test_a_resumed_live_view_reads_both_from_the_metrics():
    callback = StatusCallback("t", Console(file=io.StringIO()), live=False, quantized=True,
                              start=StartingPoints.from_records([SIXTEEN, NF4, *TRAINED], quantized=True))
    assert callback.eval_now({"eval_loss": 2.5}) == "2.6045 → 2.5000 · NF4 base 2.8947"


@pytest.mark.parametrize("why", ["memory", "processes"])
def test_the_reason_is_recorded_when_the_16_bit_base_cannot_be_evaluated(tiny_model_dir, write_recipe, why):
    from qlora_kit.model.loading import choose_precision
    from qlora_kit.recipe.loading import load_recipe

    recipe = load_recipe(write_recipe(f'[model]\nname = "{tiny_model_dir}"\ninit = "random"\n'
                                      '[data]\nsource = "x.jsonl"\n'))
    out = io.StringIO()
    record = evaluate_16bit_base(recipe, choose_precision(recipe.quant), examples=[], pad_id=0,
                                 console=Console(file=out), distributed=why == "processes",
                                 free=1024 if why == "memory" else None)
    assert record["step"] == 0 and "base_16bit_eval_loss" not in record and out.getvalue() == ""
    if why == "memory":
        assert record[NOT_MEASURED].startswith("not measured: the 16-bit base needs about 0.5 GiB of RAM and 0.0 GiB")
    else:
        assert "multi-process" in record[NOT_MEASURED]
