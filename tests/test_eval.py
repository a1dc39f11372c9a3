"""`python -m qlora_kit.eval`: base vs fine-tuned multiple-choice accuracy on lm-evaluation-harness, for real.

A tiny 2-layer Qwen2 whose output head is all zeros is the base: every token gets the same logit, so every
option's letter ties on its log-likelihood per token and the base picks what lm_eval picks on a tie, the first
option of the shortest continuation (" A" and " B" are one token in the demo tokenizer, " C" and " D" two): base
accuracy is exactly the share of questions whose answer is A. A LoRA adapter on that head, trained here on the
right letters, is the fine-tuned model: exactly right on every question. The same questions are also scored
through lm_eval's own `medqa_4options` task definition, its data pointed at a local file in MedQA's layout, and
must come out the same. No network: hub tasks are exercised for real only where their data can be loaded.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qlora_kit.errors import UserError

pytest.importorskip("lm_eval", reason="the [eval] extra (lm_eval) is not installed")

QUESTIONS = [  # written for this test; answers: 3 A, 2 B, 2 C, 1 D
    ("Which vitamin prevents scurvy?", ["C", "D", "K", "B12"], "A"),
    ("Which organ makes insulin?", ["liver", "pancreas", "spleen", "heart"], "B"),
    ("Normal body temperature?", ["33 °C", "35 °C", "37 °C", "41 °C"], "C"),
    ("Which cells carry oxygen?", ["platelets", "neutrophils", "plasma", "red cells"], "D"),
    ("Largest organ?", ["skin", "liver", "lung", "brain"], "A"),
    ("Which drug first for anaphylaxis?", ["antihistamine", "epinephrine", "steroid", "saline"], "B"),
    ("How many heart chambers?", ["two", "three", "four", "five"], "C"),
    ("Which nerve carries vision?", ["optic", "vagus", "facial", "sciatic"], "A"),
]
BASE_CORRECT = sum(answer == "A" for *_, answer in QUESTIONS)


def write_questions(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for question, options, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "options": options, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A run directory as qlora_kit.run leaves one: recipe.toml + adapter/, on a saved zero-head base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.eval.questions import load_questions
    from qlora_kit.model.loading import choose_precision, load_model
    from qlora_kit.recipe.loading import load_recipe, recipe_to_toml

    root = tmp_path_factory.mktemp("eval")
    base_dir = root / "zero-head"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))  # seeded random weights
    with torch.no_grad():
        base.lm_head.weight.zero_()
    base.save_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(base_dir)
    recipe_path = root / "recipe.toml"
    recipe_path.write_text(f'[model]\nname = "{base_dir}"\n[data]\nsource = "rows.jsonl"\n', encoding="utf-8")
    recipe = load_recipe(recipe_path)
    model = load_model(recipe, choose_precision(recipe.quant))  # the 4-bit base, as a run loads it
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["lm_head"]))
    questions = load_questions(write_questions(root / "questions.jsonl"))
    train_to_prefer_the_answers(model, tokenizer, questions)
    run_dir = root / "run"
    model.save_pretrained(run_dir / "adapter", save_embedding_layers=False)
    tokenizer.save_pretrained(run_dir / "adapter")
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    return {"dir": run_dir, "questions": root / "questions.jsonl", "root": root}


def train_to_prefer_the_answers(model, tokenizer, questions, steps: int = 80) -> None:
    """Cross-entropy on each right letter after the question's "Answer:", exactly where lm_eval scores it. Only the
    head's LoRA trains, so the frozen layers run once: their output, the head's input, is captured and reused."""
    head = model.get_output_embeddings()
    inputs, targets = [], []

    def capture(module, args):
        inputs.append(args[0].detach())

    hook = head.register_forward_pre_hook(capture)
    with torch.no_grad():
        for q in questions:
            context = tokenizer(q.prompt(), add_special_tokens=False).input_ids
            whole = tokenizer(q.prompt() + " " + q.letters[q.answer], add_special_tokens=False).input_ids
            model(input_ids=torch.tensor([whole]))
            inputs[-1] = inputs[-1][0, len(context) - 1:-1]  # the positions that predict the letter's tokens
            targets.append(torch.tensor(whole[len(context):]))
    hook.remove()
    hidden, target = torch.cat(inputs), torch.cat(targets)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(hidden).float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    from qlora_kit.eval.cli import main

    code = main([str(tiny_run["dir"]), "--file", str(tiny_run["questions"]), "--batch-size", "4"])
    return {"code": code, "record": json.loads((tiny_run["dir"] / "eval.json").read_text()),
            "report": (tiny_run["dir"] / "report.md").read_text()}


def test_base_and_fine_tuned_accuracy_are_exact(evaluated):
    from qlora_kit.eval.stats import wilson

    assert evaluated["code"] == 0
    (task,) = evaluated["record"]["tasks"]
    n = len(QUESTIONS)
    assert task["questions"] == n and task["of"] == n
    assert task["base"]["correct"] == BASE_CORRECT and task["fine_tuned"]["correct"] == n
    assert task["base"]["accuracy"] == round(BASE_CORRECT / n, 4) and task["fine_tuned"]["accuracy"] == 1.0
    assert task["base"]["ci95"] == [round(v, 4) for v in wilson(BASE_CORRECT, n)]
    assert {row["base"] for row in task["per_question"]} == {"A"}  # the tie goes to the first option
    assert all(row["fine_tuned"] == row["answer"] for row in task["per_question"])


def test_report_md_gets_the_table_once(evaluated, tiny_run):
    from qlora_kit.eval.results import SECTION_START, add_to_report

    report = evaluated["report"]
    assert "| task | questions | base | fine-tuned | change |" in report
    assert f"{BASE_CORRECT}/{len(QUESTIONS)}" in report and "+62.5 points" in report
    add_to_report(tiny_run["dir"], evaluated["record"])  # evaluating again replaces the section
    assert (tiny_run["dir"] / "report.md").read_text().count(SECTION_START) == 1


def test_medqa_task_definition_scores_the_same(tiny_run, evaluated):
    """lm_eval's own medqa_4options (its YAML and preprocess_medqa.py), on our questions in MedQA's layout."""
    import lm_eval.tasks

    from qlora_kit.chat.loading import locate
    from qlora_kit.eval.cli import load_sides
    from qlora_kit.eval.harness import hub_tasks
    from qlora_kit.eval.runner import run_tasks

    medqa = tiny_run["root"] / "medqa.jsonl"
    with medqa.open("w", encoding="utf-8") as f:
        for question, options, answer in QUESTIONS:
            row = {"sent1": question, **{f"ending{i}": o for i, o in enumerate(options)}, "label": "ABCD".index(answer)}
            f.write(json.dumps(row) + "\n")
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(medqa)}},
             "training_split": None, "validation_split": None}
    (task,) = hub_tasks(["medqa_4options"], overrides={"medqa_4options": local},
                        task_dirs=[Path(lm_eval.tasks.__file__).parent / "medqa"])
    assert task.name == "medqa_4options" and task.size == len(QUESTIONS)
    loaded = load_sides(locate(tiny_run["dir"]), batch_size=4)
    outcome = run_tasks([task], loaded.sides, 0, Console(file=io.StringIO()))
    correct = {side: sum(s.correct for s in scores) for side, scores in outcome.results[0].scores.items()}
    assert correct == {"base": BASE_CORRECT, "fine_tuned": len(QUESTIONS)}
    # the very choices our local task made, question by question
    ours = evaluated["record"]["tasks"][0]["per_question"]
    assert [s.choice for s in outcome.results[0].scores["fine_tuned"]] == ["ABCD".index(r["answer"]) for r in ours]


def test_generate_reads_the_letter_after_the_reasoning(tiny_run):
    """--generate: the zero-head base writes token 0 forever and never closes its reasoning: no letter, 8 of 8."""
    from qlora_kit.eval.cli import main

    code = main([str(tiny_run["dir"]), "--file", str(tiny_run["questions"]), "--generate", "--max-new-tokens", "6",
                 "--limit", "4"])
    assert code == 0
    record = json.loads((tiny_run["dir"] / "eval.json").read_text())
    generated = record["tasks"][1]
    assert generated["task"].endswith("_generate") and generated["questions"] == 4
    assert generated["base"]["unparsable"] == 4 and generated["base"]["correct"] == 0
    tuned = generated["fine_tuned"]
    assert 0 <= tuned["correct"] + tuned["unparsable"] <= 4


def test_a_merged_folder_is_scored_against_the_base_its_recipe_names(tiny_run):
    """The adapter folded into the original 16-bit base (peft's merge_and_unload), saved with the run's recipe beside
    it as qlora_kit.merge leaves a folder: merged vs that recipe's base, both 16-bit. The base still ties on every
    option; the merged model gets 7 of 8 (measured): the adapter was trained on the NF4 base's activations, which
    the original weights do not reproduce exactly (why qlora_kit.merge folds into the NF4 round trip by default)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.eval.cli import main
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE

    recipe = load_recipe(tiny_run["dir"] / "recipe.toml")
    merged_dir = tiny_run["root"] / "merged"
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name)
    PeftModel.from_pretrained(base, tiny_run["dir"] / "adapter").merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(recipe.model.name).save_pretrained(merged_dir)
    (merged_dir / TRAINING_RECIPE_FILE).write_text((tiny_run["dir"] / "recipe.toml").read_text(), encoding="utf-8")
    assert main([str(merged_dir), "--file", str(tiny_run["questions"])]) == 0
    record = json.loads((merged_dir / "eval.json").read_text())
    (task,) = record["tasks"]
    assert task["base"]["correct"] == BASE_CORRECT and task["fine_tuned"]["correct"] >= len(QUESTIONS) - 2
    assert record["sides"]["fine_tuned"].startswith("merged") and record["sides"]["base"].startswith("base")


def test_ctrl_c_keeps_the_blocks_both_sides_scored(tiny_run):
    """Ctrl-C arrives while the fine-tuned side scores the second block: the first block stays, on both sides."""
    import contextlib

    from qlora_kit.chat.loading import locate
    from qlora_kit.eval.cli import load_sides
    from qlora_kit.eval.harness import local_task
    from qlora_kit.eval.questions import load_questions
    from qlora_kit.eval.results import eval_record
    from qlora_kit.eval.runner import run_tasks

    loaded = load_sides(locate(tiny_run["dir"]), batch_size=4)
    entered = []

    @contextlib.contextmanager
    def interrupted_the_second_time():
        entered.append(1)
        if len(entered) == 2:
            raise KeyboardInterrupt
        yield

    loaded.sides[1].context = interrupted_the_second_time
    task = local_task(load_questions(tiny_run["questions"]), "questions.jsonl")
    outcome = run_tasks([task], loaded.sides, 0, Console(file=io.StringIO()), block=4)
    assert outcome.interrupted
    assert {side: len(scores) for side, scores in outcome.results[0].scores.items()} == {"base": 4, "fine_tuned": 4}
    record = eval_record(outcome, "run", "", {}, "", {})
    assert record["interrupted"] and record["tasks"][0]["questions"] == 4 and record["tasks"][0]["of"] == 8


def test_the_end_of_a_run_scores_the_recipes_eval_section(tiny_run):
    """What qlora_kit.run calls once training is done: the [eval] file, read from the recipe's folder."""
    from qlora_kit.eval.after_run import evaluate_finished_run
    from qlora_kit.recipe.loading import load_recipe

    recipe_path = tiny_run["root"] / "with_eval.toml"
    recipe_path.write_text((tiny_run["dir"] / "recipe.toml").read_text(), encoding="utf-8")
    recipe = load_recipe(recipe_path, ["eval.file=questions.jsonl", "eval.limit=4", f"output.dir={tiny_run['dir']}"])
    record = evaluate_finished_run(recipe, Console(file=io.StringIO()))
    (task,) = record["tasks"]
    assert task["questions"] == 4 and task["fine_tuned"]["correct"] == 4
    assert evaluate_finished_run(load_recipe(tiny_run["dir"] / "recipe.toml"), Console(file=io.StringIO())) is None


@pytest.mark.parametrize(("answer", "letter"), [
    ("C", "C"), ("(B) pancreas", "B"), ("The answer is D.", "D"), ("**A**", "A"), ("answer: c", "C"),
    ("I do not know", None), ("Vitamin C deficiency, so C.", "C"),
])
def test_chosen_letter(answer, letter):
    from qlora_kit.data.choices import chosen_letter

    assert chosen_letter(answer, ["A", "B", "C", "D"]) == letter


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_rows_are_listed_with_their_line_numbers(tmp_path):
    from qlora_kit.eval.questions import load_questions

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": "ok?", "options": ["yes", "no"], "answer": "A"}),
        "{not json",
        json.dumps({"question": "", "options": ["a", "b"], "answer": 0}),
        json.dumps({"question": "q", "options": ["a", "b"], "answer": "maybe"}),
        json.dumps({"question": "q", "options": {"A": "x", "C": "y"}, "answer": "A"}),
        json.dumps({"question": "q", "options": ["a", "b"]}),
        json.dumps({"question": "q", "options": ["a", "b", "c"], "answer": 3}),
    ]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_questions(path)
    text = caught.value.render()
    assert "6 of the rows cannot be scored" in text
    for fragment in ("not valid JSON", "line 2", "`question` is not a non-empty text: line 3",
                     "`answer` must be a letter", "line 4", "keys must be A, B, C", "line 5",
                     "missing `answer`: line 6",
                     "`answer` points past the options: line 7"):
        assert fragment in text, text


def test_column_map_and_option_keys(tmp_path):
    from qlora_kit.eval.questions import load_questions, parse_column_map

    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"stem": "Q?", "choices": {"A": "x", "B": "y", "C": "z"}, "label": "c"}) + "\n",
                    encoding="utf-8")
    (q,) = load_questions(path, parse_column_map("question=stem,options=choices,answer=label"))
    assert q.options == ("x", "y", "z") and q.answer == 2 and q.number == 1
    assert q.prompt() == "Question: Q?\nA. x\nB. y\nC. z\nAnswer:"
    with pytest.raises(UserError, match="column map"):
        parse_column_map("prompt=stem")


def test_missing_extra_is_one_screen_with_the_install_line(monkeypatch):
    from qlora_kit.eval.harness import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does when a package is not installed
    with pytest.raises(UserError) as caught:
        require_lm_eval()
    assert 'pip install -e ".[eval]"' in caught.value.render()


def test_an_unknown_task_is_named_with_the_closest():
    import lm_eval.tasks

    from qlora_kit.eval.harness import hub_tasks

    with pytest.raises(UserError, match="did you mean `medqa_4options`"):
        hub_tasks(["medqa_4option"], task_dirs=[Path(lm_eval.tasks.__file__).parent / "medqa"])


def test_a_hub_task_where_the_network_allows(tiny_run):
    """medqa_4options with its real data: scored where the hub (or the datasets cache) has it. The tests run with
    HF_HUB_OFFLINE=1 unless it is set to 0: then the one-screen message is checked and the test skips."""
    import lm_eval.tasks

    from qlora_kit.chat.loading import locate
    from qlora_kit.eval.cli import load_sides
    from qlora_kit.eval.harness import hub_tasks
    from qlora_kit.eval.runner import run_tasks

    try:
        (task,) = hub_tasks(["medqa_4options"], task_dirs=[Path(lm_eval.tasks.__file__).parent / "medqa"])
    except UserError as error:
        text = error.render()
        assert "Could not load the data of lm_eval task `medqa_4options`" in text and "--file questions.jsonl" in text
        pytest.skip("medqa_4options' data cannot be downloaded here (HF_HUB_OFFLINE=0 to try); the message is right")
    assert task.size > 1000  # MedQA's test split
    outcome = run_tasks([task], load_sides(locate(tiny_run["dir"]), batch_size=4).sides, 4, Console(file=io.StringIO()))
    assert {side: len(scores) for side, scores in outcome.results[0].scores.items()} == {"base": 4, "fine_tuned": 4}


def test_nothing_to_evaluate(tiny_run):
    from qlora_kit.eval.cli import main

    assert main([str(tiny_run["dir"])]) == 2  # the run's recipe has no [eval] section either
