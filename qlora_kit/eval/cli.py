"""`python -m qlora_kit.eval RUN_DIR_OR_MERGED [--tasks T1,T2] [--file questions.jsonl] [--limit N] [--generate]`

Multiple-choice accuracy of the base and the fine-tuned model, side by side, with the number of questions and a
95 % confidence interval; eval.json and a section of report.md in the folder evaluated.

    run dir     the base loaded as the run loaded it (4-bit) with the adapter on top: the base is the same weights
                with the adapter switched off, so both sides share one copy in memory
    merged dir  the merged model, against the base its qlora_kit_recipe.toml names (16-bit, as the merged one)

Without --tasks and --file, the run's own [eval] section says what to score.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.chat.cli import positive_int
from qlora_kit.errors import EXIT_INTERRUPTED, UserError, print_user_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name("python -m qlora_kit.eval"), description=__doc__.split("\n\n")[1].strip(),
        epilog="examples:\n  python -m qlora_kit.eval runs/medical --file my_exam.jsonl\n"
               "  python -m qlora_kit.eval runs/medical --tasks medqa_4options,cmmlu_clinical_knowledge --limit 200\n"
               "  python -m qlora_kit.eval runs/medical/merged --file my_exam.jsonl --generate",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="RUN_DIR_OR_MERGED", help="a run directory or a merged model folder")
    parser.add_argument("--tasks", default=None, metavar="T1,T2",
                        help="lm-evaluation-harness tasks, comma-separated (needs their data from the hub once)")
    parser.add_argument("--file", default=None, help="your own questions: .jsonl of question, options, answer")
    parser.add_argument("--columns", default="", metavar="question=..,options=..,answer=..",
                        help="the file's column names, where they differ")
    parser.add_argument("--limit", type=non_negative, default=None, metavar="N",
                        help="score only the first N questions of each task and of the file (0: all)")
    parser.add_argument("--generate", action="store_true",
                        help="also let the model reason and read the letter it writes after </think> (slow)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024, metavar="N",
                        help="longest reply with --generate, reasoning included (default 1024)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="sequences per forward pass")
    return parser.parse_args(argv)


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qlora_kit.cli import command_name

    command = shlex.join([*command_name("python -m qlora_kit.eval").split(), *(sys.argv[1:] if argv is None else argv)])
    from rich.console import Console

    try:
        request = request_from_args(args)
        record = evaluate(request, Console(highlight=False), command)
    except UserError as error:
        print_user_error(error)
        return error.exit_code
    return EXIT_INTERRUPTED if record["interrupted"] else 0


@dataclass
class Request:
    folder: Path
    tasks: list[str] = field(default_factory=list)
    file: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    limit: int = 0
    generate: bool = False
    max_new_tokens: int = 1024
    batch_size: int = 8


def split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def request_from_args(args: argparse.Namespace) -> Request:
    from qlora_kit.chat.loading import locate
    from qlora_kit.eval.questions import parse_column_map
    from qlora_kit.recipe.run_files import RECIPE_FILE

    source = locate(Path(args.model_dir))
    request = Request(source.dir, split_names(args.tasks or ""), args.file or "", parse_column_map(args.columns),
                      args.limit or 0, args.generate, args.max_new_tokens, args.batch_size)
    if args.tasks is None and args.file is None and source.kind == "run":  # the run's own [eval] section
        from qlora_kit.recipe.loading import load_recipe

        asked = load_recipe(source.dir / RECIPE_FILE).eval
        request.tasks, request.file = split_names(asked.tasks), asked.file
        request.limit = args.limit if args.limit is not None else asked.limit
        request.generate |= asked.generate
    if not request.tasks and not request.file:
        raise UserError("Nothing to evaluate: give --tasks, --file, or both.",
                        ["--tasks medqa_4options,cmmlu_clinical_knowledge: lm-evaluation-harness tasks (data from "
                         "the hub)", "--file questions.jsonl: your own multiple-choice questions"],
                        hint="A run can also name them in its recipe's [eval] section.")
    return request


# ------------------------------------------------------------------------------------------------ the evaluation


def evaluate(request: Request, console, command: str) -> dict:
    """Check the inputs, load the model(s), score every task on both sides, write eval.json and report.md."""
    from qlora_kit.chat.loading import locate
    from qlora_kit.console import quiet_libraries
    from qlora_kit.eval import harness, results
    from qlora_kit.eval.questions import load_questions

    quiet_libraries()
    questions = load_questions(request.file, request.columns) if request.file else []  # bad rows: before loading
    harness.require_lm_eval()
    tasks = harness.hub_tasks(request.tasks) if request.tasks else []
    source = locate(request.folder)
    with console.status(f"loading {source.dir}"):
        loaded = load_sides(source, request.batch_size)
    console.print(f"[dim]{loaded.description}")
    if questions:
        name = harness.task_name_for(request.file)
        tasks.insert(0, harness.local_task(questions, f"{request.file}", name=name))
        if request.generate:
            tasks.insert(1, harness.local_task(questions, f"{request.file} (generated replies)", loaded.fmt,
                                               request.max_new_tokens, name=name))
    from qlora_kit.chat.cpu_inference import dequantized_weights
    from qlora_kit.eval.runner import run_tasks

    with dequantized_weights(loaded.model):  # a 4-bit base on a CPU: each weight dequantized once, not per pass
        outcome = run_tasks(tasks, loaded.sides, request.limit, console)
    record = results.eval_record(outcome, str(source.dir), scoring_text(request.generate),
                                 {side.name: side.label for side in loaded.sides}, command, versions())
    results.show(console, record)
    json_path = results.write_eval_json(source.dir, record)
    report_path = results.add_to_report(source.dir, record)
    console.print(f"[dim]written: {json_path}, {report_path}")
    return record


def scoring_text(generate: bool) -> str:
    text = ("multiple choice, the option whose letter has the highest log-likelihood after \"Answer:\" is the "
            "model's choice (as lm_eval's MedQA task scores)")
    if generate:
        text += "; `(generated replies)`: greedy reply, the letter named after </think>"
    return text


def versions() -> dict[str, str]:
    import contextlib
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("lm_eval", "transformers", "peft", "torch", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


@dataclass
class Loaded:
    model: object
    """The model whose 4-bit weights are dequantized once for the evaluation (the run's; a merged one has none)."""
    fmt: object
    sides: list
    description: str


def load_sides(source, batch_size: int) -> Loaded:
    from qlora_kit.chat.loading import load_merged, load_run
    from qlora_kit.eval.harness import wrap_model
    from qlora_kit.eval.runner import Side

    if source.kind == "run":
        run = load_run(source.dir)
        lm = wrap_model(run.model, run.tokenizer, batch_size)
        sides = [Side("base", "base (adapter disabled)", lm, run.model.disable_adapter),
                 Side("fine_tuned", "fine-tuned (adapter enabled)", lm)]
        return Loaded(run.model, run.fmt, sides, run.description)
    merged = load_merged(source.dir)
    sides = [Side("fine_tuned", f"merged {source.dir}", wrap_model(merged.model, merged.tokenizer, batch_size))]
    base = merged_base(source.dir)
    description = merged.description
    if base is not None:
        sides.insert(0, Side("base", f"base {base[1]}", wrap_model(base[0], merged.tokenizer, batch_size)))
    else:
        description += " (no qlora_kit_recipe.toml beside it: its base is unknown, only the merged model is scored)"
    return Loaded(merged.model, merged.fmt, sides, description)


def merged_base(folder: Path):
    """The base a merged folder came from (its recipe names it), loaded as the merged model is: 16-bit."""
    import dataclasses

    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.loading import choose_precision, load_model
    from qlora_kit.model.preflight import check_model_files
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE, QuantSection

    path = Path(folder) / TRAINING_RECIPE_FILE
    if not path.is_file():
        return None
    trained = load_recipe(path)
    recipe = dataclasses.replace(trained, quant=QuantSection(load_in_4bit=False))
    recipe.distributed.fsdp = False
    prepare_gguf_base(recipe.model, weights=True)
    check_model_files(recipe.model)
    model = load_model(recipe, choose_precision(recipe.quant))
    model.eval()
    return model, recipe.model.display_name


if __name__ == "__main__":
    sys.exit(main())
