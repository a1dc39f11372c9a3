"""The bridge to EleutherAI's lm-evaluation-harness (`lm_eval`): tasks in, per-question scores out.

Nothing here scores by itself. A hub task (`medqa_4options`, `cmmlu_clinical_knowledge`, ...) is lm_eval's own task
definition; a local questions file becomes an lm_eval task built on the fly from a config dict, scored the way
lm_eval scores MedQA: the log-likelihood of each option's letter after "Answer:", the highest one is the model's
choice. `--generate` builds a `generate_until` task instead whose process_results reads the letter the model wrote
after its reasoning. The model is an `HFLM` around the model we already loaded (the 4-bit base with its adapter),
so base and fine-tuned are scored by the same weights, the adapter switched off and on.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.data.choices import chosen_letter
from qlora_kit.data.replies import answer_part, read_reply
from qlora_kit.errors import UserError
from qlora_kit.eval.questions import Question

INSTALL = 'pip install -e ".[eval]"   (from a checkout; or: pip install "qlora_kit[eval]")'
LOCAL_TASK = "local"
"""Name of the task a questions file becomes (eval.json and report.md say which file)."""
GENERATE_SUFFIX = "_generate"
GENERATE_INSTRUCTION = "Think it through, then answer with the letter of the right option."


def require_lm_eval():
    """lm_eval, or a one-screen message saying how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise UserError("Benchmark accuracy needs EleutherAI's lm-evaluation-harness (`lm_eval`), which is not "
                        "installed.", [f"import lm_eval: {e}"],
                        hint=f"Install the optional extra:\n  {INSTALL}") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO/WARNING lines would bury the progress bar
    return lm_eval


@dataclass
class Task:
    """One lm_eval task to score, and where its questions came from."""

    name: str
    task: object
    """The lm_eval Task object."""
    source: str
    size: int
    """Questions the task has (before --limit)."""
    questions: list[Question] = field(default_factory=list)
    """For a local file: its questions, in task order."""


# ------------------------------------------------------------------------------------------------ local questions


def local_config(questions: list[Question], name: str = LOCAL_TASK, fmt=None, max_new_tokens: int = 1024) -> dict:
    """An lm_eval task config for our own questions. With `fmt` (qlora_kit.generate.PromptFormat): a generation
    task whose prompt is rendered as in training; without it, multiple choice on the option letters."""
    import datasets

    docs = [{"prompt": q.prompt(), "listing": q.prompt().removesuffix("Answer:") + GENERATE_INSTRUCTION,
             "choices": list(q.letters), "gold": q.answer, "line": q.number} for q in questions]
    dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    config = {"task": name, "custom_dataset": lambda **_: dataset, "test_split": "test", "num_fewshot": 0,
              "doc_to_target": lambda doc: doc["gold"], "metadata": {"version": 1}}
    if fmt is None:
        return config | {
            "output_type": "multiple_choice",
            "doc_to_text": lambda doc: doc["prompt"],
            "doc_to_choice": lambda doc: doc["choices"],
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return config | {
        "task": name + GENERATE_SUFFIX,
        "output_type": "generate_until",
        "doc_to_text": lambda doc: fmt.prompt(doc["listing"]),
        "target_delimiter": "",
        "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False},
        "process_results": lambda doc, results: score_reply(doc, results[0], fmt),
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "unparsable", "aggregation": "mean", "higher_is_better": False}],
    }


def score_reply(doc: dict, reply: str, fmt) -> dict:
    """A generated reply against the right letter: the answer after </think> (the whole reply when the model
    answered directly), its chosen letter, and whether there was one to read."""
    split = read_reply(reply, fmt.prompt(doc["listing"]), fmt.markers)
    answer = answer_part(split)
    letter = chosen_letter(answer, doc["choices"]) if answer is not None else None
    return {"acc": float(letter == doc["choices"][doc["gold"]]), "unparsable": float(letter is None)}


def task_name_for(path: str) -> str:
    """A questions file's task name: its file name without the suffix (`medical_mc`), else `local`."""
    return re.sub(r"[^\w-]+", "_", Path(path).stem).strip("_") or LOCAL_TASK


def local_task(questions: list[Question], source: str, fmt=None, max_new_tokens: int = 1024,
               name: str = LOCAL_TASK) -> Task:
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    config = local_config(questions, name, fmt=fmt, max_new_tokens=max_new_tokens)
    loaded = TaskManager(include_defaults=False).load([config])["tasks"]
    (name, task), = loaded.items()
    return Task(name, task, source, len(questions), questions)


# ------------------------------------------------------------------------------------------------ hub tasks


def hub_tasks(names: list[str], overrides: dict[str, dict] | None = None, task_dirs: list | None = None) -> list[Task]:
    """lm_eval's own task definitions by name (a group expands to its tasks); the data comes from the hub, or
    from the local datasets cache once it has been downloaded. `overrides` replace config keys of a named task
    (the tests point medqa_4options at a local file in its hub layout this way); `task_dirs` index only these
    folders of task YAML instead of all of lm_eval's (thousands: indexing them takes seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # how TaskManager itself reads a task's YAML

    manager = TaskManager(include_defaults=not task_dirs, include_path=task_dirs)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm_eval has no task named {', '.join(f'`{n}`' for n in unknown)}.",
                        [f"`{n}`{_did_you_mean(n, manager.all_tasks)}" for n in unknown],
                        hint="`lm_eval ls tasks` lists them all; medical ones: medqa_4options, medmcqa, "
                             "cmmlu_clinical_knowledge, mmlu_clinical_knowledge, pubmedqa.")
    tasks = []
    for name in names:
        spec = name
        if overrides and name in overrides:
            entry = manager.task_index[name]
            spec = {**load_yaml(entry.yaml_path, resolve_func=True), **overrides[name]}
        try:
            loaded = manager.load([spec])["tasks"]
        except Exception as e:  # datasets / the hub client raise many types; the user needs the message
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"Could not load the data of lm_eval task `{name}`: {type(e).__name__}: {first[:300]}",
                            ["its questions come from the Hugging Face hub on first use, then from the local "
                             "datasets cache; offline, only tasks downloaded before can run"],
                            hint="Connect once and re-run (the data is cached), or score your own questions "
                                 "offline with --file questions.jsonl.") from None
        for task_name, task in loaded.items():
            tasks.append(Task(task_name, task, f"lm_eval {task_name}", len(task.eval_docs)))
    return tasks


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(f'`{c}`' for c in close)}?)" if close else ""


# ------------------------------------------------------------------------------------------------ scoring


def wrap_model(model, tokenizer, batch_size: int):
    """lm_eval's HFLM around an already loaded model (adapter included): no second copy of the weights."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    for method in ("loglikelihood", "generate_until"):  # our progress bar, not one more of lm_eval's per block
        setattr(lm, method, functools.partial(getattr(lm, method), disable_tqdm=True))
    return lm


@dataclass
class DocScore:
    index: int
    """Position in the task's questions."""
    correct: bool
    choice: int | None = None
    """Index of the option the model chose (log-likelihood scoring); None for generation."""
    unparsable: bool = False
    """Generation: the reply named no option letter."""


def score(lm, task: Task, indices: list[int]) -> list[DocScore]:
    """lm_eval's evaluate() on these questions of one task; per question, right or wrong (and what was chosen)."""
    import lm_eval.api.task as task_module
    from lm_eval.evaluator import evaluate

    building_bar = task_module.tqdm
    task_module.tqdm = functools.partial(building_bar, disable=True)  # its request-building bar, once per block
    try:
        results = evaluate(lm=lm, task_dict={"tasks": {task.name: task.task}, "groups": {}, "group_map": {}},
                           samples={task.name: indices}, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    finally:
        task_module.tqdm = building_bar
    scores = []
    for sample in results["samples"][task.name]:
        metric = "acc" if "acc" in sample else "exact_match" if "exact_match" in sample else sample["metrics"][0]
        choice = None
        responses = sample["filtered_resps"]
        if responses and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in responses):
            choice = max(range(len(responses)), key=lambda i: responses[i][0])
        scores.append(DocScore(sample["doc_id"], bool(sample[metric] >= 1.0), choice,
                               bool(sample.get("unparsable", 0.0))))
    return sorted(scores, key=lambda s: s.index)
