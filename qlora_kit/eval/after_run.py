"""The end of a training run: the recipe's [eval] section scored on the run just finished (off by default).

The run directory is loaded afresh, as `python -m qlora_kit.eval RUN_DIR` would (the trainer's copy is gone by
then), so the numbers are the ones that command gives. A problem here (lm_eval missing, a task's data offline)
is reported and does not undo the finished run: its adapter and report are already written.
"""

from __future__ import annotations

from pathlib import Path


def evaluate_finished_run(recipe, console, is_main: bool = True) -> dict | None:
    """Score the run's [eval] tasks and file, base vs fine-tuned; None when the recipe asks for none."""
    asked = recipe.eval
    if not is_main or not (asked.tasks or asked.file):
        return None
    from qlora_kit.errors import UserError, print_user_error
    from qlora_kit.eval.cli import Request, evaluate, split_names

    file = asked.file
    if file and recipe.source_path and not Path(file).expanduser().is_absolute():
        file = str(Path(recipe.source_path).parent / Path(file).expanduser())  # read from the recipe's folder
    request = Request(Path(recipe.output.dir), split_names(asked.tasks), file, limit=asked.limit,
                      generate=asked.generate, max_new_tokens=recipe.samples.max_new_tokens)
    console.rule("[bold]eval[/] base vs fine-tuned accuracy")
    command = f"python -m qlora_kit.eval {recipe.output.dir}"
    try:
        return evaluate(request, console, command)
    except UserError as error:
        print_user_error(error)
        console.print(f"[yellow]the run is finished and saved; the evaluation did not run. Re-run it with:[/]\n"
                      f"  {command}")
        return None
