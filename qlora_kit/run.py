"""`python -m qlora_kit.run RECIPE [key=value ...] [--dry-run]`: one QLoRA fine-tuning run, the spine of qlora_kit.

recipe -> tokenizer -> rows -> prompt/completion examples -> plan -> 4-bit model + LoRA -> SFTTrainer -> adapter
-> samples -> report.md (-> the recipe's [eval]). With train.method = "grpo" the rows are questions with checkable
answers, GRPOTrainer replaces SFTTrainer and the samples are judged by the rewards (docs/grpo.md). With
train.method = "dpo", "kto" or "orpo" the rows are pairs of a better and a worse answer (KTO: answers rated good or
bad), TRL's preference trainer replaces SFTTrainer, and the held-out pairs are judged by the model's own
log-probabilities (docs/preference.md). The rest is the same. Each arrow is one package (ARCHITECTURE.md); `run`
below calls them in that order and nothing else calls this module. Heavy imports happen inside the functions, so
`--help` and a recipe typo are answered before torch loads.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from qlora_kit.errors import EXIT_INTERRUPTED, UserError, print_user_error
from qlora_kit.recipe.schema import PREFERENCE_METHODS

PROGRAM = "python -m qlora_kit.run"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name(PROGRAM),
        description="Fine-tune a reasoning model with QLoRA from a TOML recipe.",
        epilog=f"example: {command_name(PROGRAM)} recipes/medical.toml train.max_steps=50 data.max_length=1024")
    parser.add_argument("recipe", help="path of the .toml recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override recipe keys; values are TOML literals (strings may be bare)")
    parser.add_argument("--dry-run", action="store_true",
                        help="load tokenizer and data, write preview.jsonl, show the first example; load no weights")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing a finished run in output.dir")
    parser.add_argument("--restart", action="store_true",
                        help="discard this run's checkpoints and start over instead of resuming")
    parser.add_argument("--force", action="store_true",
                        help="train even if the VRAM plan says the run will not fit the GPU")
    argv = sys.argv[1:] if argv is None else argv
    if not [a for a in argv if not a.startswith("-")] and not {"-h", "--help"} & set(argv):
        parser.error(f"give a recipe file, e.g. {command_name(PROGRAM)} recipes/demo.toml")
    return parser.parse_intermixed_args(argv)  # options may come before or after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qlora_kit.cli import command_name

    # The command as typed, for "Resume with:" (qlora-kit run ... or python -m qlora_kit.run ...).
    args.command = shlex.join([*command_name(PROGRAM).split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except UserError as error:
        from qlora_kit.distributed import current

        rank = current().rank
        if rank == 0:
            print_user_error(error)
        else:  # the same message would come from every rank: rank 0 prints it, the others just say so
            print(f"rank {rank}: {error.title}", file=sys.stderr)
        return error.exit_code


def run(args: argparse.Namespace) -> int:
    # The recipe first, before torch and transformers load (seconds): a typo is answered at once.
    from qlora_kit.console import make_console, quiet_libraries
    from qlora_kit.recipe.loading import load_recipe, recipe_changes, recipe_to_toml

    recipe = load_recipe(args.recipe, args.overrides)
    method = recipe.train.method  # sft; grpo (docs/grpo.md); dpo, kto, orpo (docs/preference.md)
    rows = read_local_rows(recipe, method)  # a bad row is answered now, as a recipe typo is: before torch loads
    recipe.output.overwrite |= args.overwrite
    out = Path(recipe.output.dir)
    if not args.dry_run:  # before the long preamble: a finished run is refused at once
        from qlora_kit.train.artifacts import refuse_finished_run

        refuse_finished_run(out, recipe.output.overwrite)
    from qlora_kit.data.hub import fetch_from_modelscope, settle_hub_access
    from qlora_kit.train.trackers import check_trackers

    check_trackers(recipe)
    # One short look at the hub before the libraries load (and retry for a minute when it is unreachable).
    settle_hub_access(recipe, say=lambda text: print(text.removeprefix("[dim]")))
    quiet_libraries()
    from qlora_kit import distributed
    from qlora_kit.model.loading import load_tokenizer
    from qlora_kit.model.preflight import check_model_files, check_model_matches
    from qlora_kit.recipe.run_files import PREVIEW_FILE, RECIPE_FILE
    from qlora_kit.train.summary import show_recipe, show_summary

    processes = distributed.start()
    console = make_console(quiet=not processes.is_main)  # one voice: rank 0 speaks for all ranks
    show_recipe(console, recipe_changes(recipe), args.recipe, out / RECIPE_FILE)
    fetch_from_modelscope(recipe, weights=not args.dry_run, say=console.print)

    use_gguf_base(recipe, console, weights=not args.dry_run, is_main=processes.is_main)
    check_model_files(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    check_model_matches(recipe, tokenizer)
    examples = build_examples_for(recipe, tokenizer, console, method, rows)
    plan = check_memory_plan(recipe, console, force=args.force, examples=examples)

    if args.dry_run:
        if processes.is_main:
            write_dry_run(examples.train, recipe, tokenizer)
        shown = {"sft": "input_ids and labels", "grpo": "prompts and the answers their rewards check"}.get(
            method, "prompts and both sides as ids")
        console.print(f"[bold]dry run:[/] no weights loaded; {out / PREVIEW_FILE} shows the {shown} of the "
                      f"first {recipe.output.preview_rows} examples.")
        return 0

    from qlora_kit.train.artifacts import prepare_output_dir

    # Every rank checks (so all refuse alike); only rank 0 changes the directory, the others wait for it.
    resume_from, resume_step = prepare_output_dir(out, recipe, recipe.output.overwrite, args.restart,
                                                  change=processes.is_main)
    if processes.is_main:
        (out / RECIPE_FILE).write_text(recipe_to_toml(recipe), encoding="utf-8")
    distributed.wait_for_everyone()
    if resume_from:
        console.print(f"[bold]resuming[/] from step {resume_step} ({resume_from})")

    if method == "grpo":
        from qlora_kit.train.grpo import fit_grpo as fit
    elif method in PREFERENCE_METHODS:
        from qlora_kit.train.preference import fit_preference as fit
    else:
        from qlora_kit.train.fit import fit
    outcome = fit(recipe, tokenizer, examples, out, console, resume_from, resume_step, processes)
    if outcome.interrupted:
        # Without --overwrite: the directory now holds an unfinished run, which re-running resumes.
        resume = args.command.replace(" --overwrite", "")
        console.print(f"[bold yellow]stopped by {outcome.interrupted}[/] at step {outcome.step}; checkpoint saved. "
                      f"Resume with:\n  {resume}")
        return EXIT_INTERRUPTED
    if processes.is_main:
        samples, judged = ask_the_trained_model(outcome, tokenizer, recipe, examples, out, console, method)
        outcome.model = None  # freed before the evaluation loads the run afresh
        write_run_report(recipe, args.command, examples.data_report, outcome.summary, samples, plan, judged)
    show_summary(console, outcome.summary, out)
    from qlora_kit.eval.after_run import evaluate_finished_run  # the recipe's [eval] section, when it has one

    evaluate_finished_run(recipe, console, is_main=processes.is_main)
    return 0


def read_local_rows(recipe, method: str):
    """A local data file's rows, read and checked (every row, by line number) in a second, before the libraries load;
    None for a hub data set, which is read later with the libraries it needs."""
    from qlora_kit.data.rows import is_local_source

    if not is_local_source(recipe.data):
        return None
    if method == "grpo":
        from qlora_kit.data.checkable import load_checkable

        return load_checkable(recipe.data, recipe.train.seed)
    if method in PREFERENCE_METHODS:
        from qlora_kit.data.pairs import load_preference_rows

        return load_preference_rows(recipe.data, method, recipe.train.seed)
    from qlora_kit.data.rows import load_rows

    return load_rows(recipe.data)


def build_examples_for(recipe, tokenizer, console, method: str, rows=None):
    """SFT: prompt/completion token ids with the completion mask, the first one shown with its trained tokens.
    GRPO: prompts with the answers the rewards check (the completions are the model's own, written in training).
    Preference tuning: the prompt and each side's ids, the first pair shown. `rows`: read_local_rows's, or None."""
    if method == "grpo":
        from qlora_kit.data.checkable import build_grpo_examples

        return build_grpo_examples(recipe, tokenizer, console, rows)
    if method in PREFERENCE_METHODS:
        from qlora_kit.data.pairs import build_preference_examples

        return build_preference_examples(recipe, tokenizer, console, rows)
    from qlora_kit.data.examples import build_examples
    from qlora_kit.data.report import show_example

    examples = build_examples(recipe, tokenizer, console, rows)
    show_example(console, examples.train[0], tokenizer)
    return examples


def ask_the_trained_model(outcome, tokenizer, recipe, examples, out: Path, console, method: str):
    """The held-out rows answered with the adapter off, then on, by the model still in memory: (samples, judged
    lines). SFT: samples.md and the format counts. GRPO: every reply scored by the run's own rewards. Preference
    tuning: the held-out pairs ranked before and after, and samples.md."""
    if method in PREFERENCE_METHODS:
        from qlora_kit.results.preference_judge import judge_finished_run

        return judge_finished_run(outcome, tokenizer, recipe, examples, out, console)
    if method == "grpo":
        from qlora_kit.results.grpo_samples import judge_finished_run

        return [], judge_finished_run(outcome, tokenizer, recipe, examples, out, console).lines()
    from qlora_kit.results.samples import sample_finished_run

    return sample_finished_run(outcome, tokenizer, recipe, examples, out, console), []


def use_gguf_base(recipe, console, weights: bool, is_main: bool) -> None:
    """A .gguf base becomes a 16-bit folder in the cache (made once, by rank 0; the other ranks then find it)."""
    from qlora_kit import distributed
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.recipe.schema import is_gguf_base

    if not is_gguf_base(recipe.model):
        return
    if is_main:
        prepare_gguf_base(recipe.model, weights=weights, console=console)
    distributed.wait_for_everyone()
    if not is_main:
        prepare_gguf_base(recipe.model, weights=weights)


def write_dry_run(train_examples, recipe, tokenizer) -> None:
    """--dry-run's files: the resolved recipe, and the first examples exactly as the trainer would see them."""
    from qlora_kit.recipe.loading import recipe_to_toml
    from qlora_kit.recipe.run_files import PREVIEW_FILE, RECIPE_FILE
    from qlora_kit.train.artifacts import write_preview

    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(recipe_to_toml(recipe), encoding="utf-8")
    if recipe.train.method in PREFERENCE_METHODS:
        from qlora_kit.data.pairs import write_pair_preview

        write_pair_preview(train_examples[: recipe.output.preview_rows], out / PREVIEW_FILE, tokenizer)
        return
    if recipe.train.method == "grpo":  # prompts only: the completions are the model's own, written in training
        from qlora_kit.train.artifacts import write_prompt_preview

        write_prompt_preview(train_examples[: recipe.output.preview_rows], out / PREVIEW_FILE)
        return
    write_preview(train_examples[: recipe.output.preview_rows], out / PREVIEW_FILE, tokenizer)


def write_run_report(recipe, command: str, data_report: list[str], summary: dict, samples: list, plan,
                     judged: list[str] = ()) -> None:
    from qlora_kit.recipe.loading import recipe_to_toml
    from qlora_kit.results.report import write_report

    label = summary.get("model_weights", "")
    write_report(Path(recipe.output.dir), title=f"{recipe.model.display_name} · {label}", command=command,
                 recipe_toml=recipe_to_toml(recipe), data_report=data_report, summary=summary,
                 samples=samples, planned_reserved_gib=plan.reserved_gib if plan else None, judged_lines=judged)


def check_memory_plan(recipe, console, force: bool, examples=None):
    """Show the plan before any weight loads: on a GPU the VRAM plan; on a CPU this machine's RAM and time plan, with
    the rows' real lengths (SFT; GRPO's prompts say nothing of the completions', so max_length stands in). Refuse a
    run that clearly does not fit (the OOM would come later) unless `force`. Returns the VRAM plan on a GPU
    (report.md sets it against the measured peak), None on a CPU."""
    import torch

    from qlora_kit.distributed import current
    from qlora_kit.plan.estimate import make_plan, print_plan, read_architecture

    arch = read_architecture(recipe.model)
    sharded = recipe.distributed.fsdp and current().distributed
    if not torch.cuda.is_available():
        from qlora_kit.cli import command_name
        from qlora_kit.plan.cpu import make_cpu_plan, print_cpu_plan

        sft = examples is not None and recipe.train.method == "sft"
        cpu = make_cpu_plan(arch, recipe, [len(e.input_ids) for e in examples.train] if sft else None,
                            [len(e.input_ids) for e in examples.eval] if sft and examples.eval else None)
        console.rule("[bold]memory and time plan (this CPU: no GPU here)")
        print_cpu_plan(cpu, console)
        console.print(f"[dim]A GPU's VRAM plan: {command_name('python -m qlora_kit.plan')} RECIPE --gpu 8")
        if not cpu.fits and not force and not current().distributed:  # N processes: N shares of one machine's RAM
            raise UserError(f"The plan says this run may need about {cpu.peak_gib:.1f} GiB of RAM; "
                            f"{cpu.available_ram_gib:.1f} GiB are free.",
                            hint="Lower data.max_length or train.batch_size, turn train.gradient_checkpointing on, "
                                 "or close other programs; --force tries anyway.")
        return None
    vram_gib = torch.cuda.mem_get_info()[1] / 1024**3
    plan = make_plan(arch, recipe, vram_gib)
    console.rule("[bold]memory plan")
    print_plan(plan, console)
    if sharded:  # the planner knows one GPU holding everything; FSDP splits weights and adapter state over N
        console.print(f"[dim]FSDP: this is the unsharded plan; over {current().world_size} GPUs each holds a share "
                      "of the weights and the adapter state (but loads the whole 4-bit model once before sharding).")
    if not plan.fits and not force and not sharded:
        raise UserError(f"The plan says this run needs about {plan.peak_gib:.1f} GiB; this GPU has "
                        f"{vram_gib:.1f} GiB.", hint=f"Try {plan.suggestion}, or pass --force to try anyway.")
    return plan


if __name__ == "__main__":
    sys.exit(main())
