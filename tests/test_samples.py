"""End-of-run samples for real: the demo trained in-process, then samples.md written from the trainer's own
model with the adapter switched off and on, as train.fit does after saving the adapter."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, encode_for_training
from rich.console import Console

from qlora_kit.data.encode import Encoder, to_dataset
from qlora_kit.data.examples import build_examples
from qlora_kit.data.rows import load_rows, split_rows
from qlora_kit.model.loading import add_lora, choose_precision, load_model
from qlora_kit.recipe.loading import load_recipe
from qlora_kit.recipe.run_files import SAMPLES_FILE
from qlora_kit.results.markdown import fenced
from qlora_kit.results.samples import format_counts, write_run_samples
from qlora_kit.train.fit import build_trainer

DEMO = REPO / "recipes" / "demo.toml"
COUNT = 3


def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode, the model's mode left as it was."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.train(was_training)
    return logits


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Train the demo recipe in-process, then write the samples from the trainer's model, still in train mode."""
    out = tmp_path_factory.mktemp("samples")
    recipe = load_recipe(DEMO, ["train.max_steps=30", "train.eval_steps=0", f"output.dir={out}",
                                f"samples.count={COUNT}", "samples.max_new_tokens=48"])
    tokenizer, train_rows, renderer, examples = encode_for_training(recipe)
    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora, seed=recipe.train.seed)
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(examples), None, precision, out, [])
    trainer.train()
    model = trainer.model
    model.train()  # as the trainer leaves it
    probe = torch.tensor([Encoder(tokenizer, renderer).encode(train_rows[0]).input_ids])
    before = model_logits(model, probe)
    console = Console(file=io.StringIO(), width=120, soft_wrap=False)
    chosen = build_examples(recipe, tokenizer, Console(file=io.StringIO()))
    samples = write_run_samples(model, tokenizer, recipe, chosen.sample_rows, chosen.samples_from, out, console)
    path = out / SAMPLES_FILE
    return {"recipe": recipe, "model": model, "path": path, "samples": samples, "rows": chosen.sample_rows,
            "text": path.read_text(encoding="utf-8"), "terminal": console.file.getvalue(),
            "probe": probe, "before": before}


def sections(markdown: str) -> list[str]:
    return re.split(r"^## \d+\. ", markdown, flags=re.MULTILINE)[1:]


def test_samples_md_has_every_part_of_every_question(sampled):
    assert sampled["path"] == Path(sampled["recipe"].output.dir) / SAMPLES_FILE
    text = sampled["text"]
    assert text.startswith("# Samples: base vs fine-tuned\n")
    assert "held-out eval rows" in text and "sampling (temperature 0.6, top_p 0.95, seed 42)" in text
    rows = sampled["rows"]
    parts = sections(text)
    assert len(parts) == COUNT == len(sampled["samples"])
    assert [sample.row for sample in sampled["samples"]] == rows
    for row, part in zip(rows, parts, strict=True):
        assert f"**Question** (row {row.number})" in part and f"> {row.question}" in part
        assert f"**Reference answer**\n\n> {row.response}" in part
        assert f"<details><summary>Reference reasoning</summary>\n\n```text\n{row.cot}\n```" in part
        assert part.index("### Base (adapter disabled)") < part.index("### Fine-tuned (adapter enabled)")
        assert part.count("<details><summary>Reasoning</summary>") == 2 and part.count("**Answer**") == 2
        assert part.count("the trained format_") == 2 and part.count("tokens, ") == 2


def test_base_and_fine_tuned_replies_differ(sampled):
    """Same prompt, same seed: only the adapter differs, so the replies must."""
    differ = []
    for part in sections(sampled["text"]):
        base, tuned = part.split("### Fine-tuned (adapter enabled)")
        base = base.split("### Base (adapter disabled)")[1]
        differ.append(base.strip() != tuned.strip())
    assert any(differ)


def test_adapter_is_enabled_and_mode_restored_afterwards(sampled):
    model, probe = sampled["model"], sampled["probe"]
    assert model.training  # back in the mode it was in
    after = model_logits(model, probe)
    assert torch.equal(after, sampled["before"])
    with model.disable_adapter():
        base = model_logits(model, probe)
    assert not torch.allclose(base, after, atol=1e-3)  # the adapter matters, and it is on again


def test_terminal_shows_both_columns(sampled):
    terminal = sampled["terminal"]
    assert "base (adapter disabled)" in terminal and "fine-tuned" in terminal
    assert terminal.count("reference:") == COUNT and str(sampled["path"]) in terminal.replace("\n", "")


def test_format_compliance_is_counted_per_side(sampled):
    counts = format_counts(sampled["samples"])
    assert counts == {"base": sum(s.base.in_format for s in sampled["samples"]),
                      "fine_tuned": sum(s.tuned.in_format for s in sampled["samples"]), "of": COUNT}
    line = f"format: base {counts['base']}/{COUNT}, fine-tuned {counts['fine_tuned']}/{COUNT}"
    assert line in sampled["text"] and line in sampled["terminal"]


def test_samples_ask_the_run_s_own_held_out_rows_and_without_them_the_first_training_rows(demo_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "qlora_kit" / "demo" / "tiny-qwen2")
    quiet = Console(file=io.StringIO())
    recipe = load_recipe(DEMO, ["samples.count=2"])
    train_rows, eval_rows = split_rows(load_rows(recipe.data).rows, recipe.data, recipe.train.seed)
    chosen = build_examples(recipe, tokenizer, quiet)
    assert chosen.sample_rows == eval_rows[:2] and "held-out" in chosen.samples_from
    assert [e.row for e in chosen.eval] == [r.number for r in eval_rows]  # every demo row fits max_length

    recipe = load_recipe(DEMO, ["data.eval_rows=0", "train.eval_steps=0", "samples.count=2"])
    train_rows, _ = split_rows(load_rows(recipe.data).rows, recipe.data, recipe.train.seed)
    chosen = build_examples(recipe, tokenizer, quiet)
    assert chosen.sample_rows == train_rows[:2] and "the model has seen these" in chosen.samples_from


def test_fenced_keeps_any_model_output_verbatim_and_the_file_text():
    assert fenced("plain") == "```text\nplain\n```"
    assert fenced("a ```` b").startswith("`````text\n")  # a longer fence than any backtick run inside
    assert fenced("bell\x07\ttab\nline") == "```text\nbell\\x07\ttab\nline\n```"
