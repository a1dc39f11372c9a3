"""`python -m qlora_kit.run RECIPE [key=value ...] [--dry-run]`: one QLoRA fine-tuning run.

recipe -> tokenizer -> rows -> prompt/completion examples -> 4-bit model + LoRA -> SFTTrainer -> artifacts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_kit.run",
        description="Fine-tune a reasoning model with QLoRA from a TOML recipe.",
        epilog="example: python -m qlora_kit.run recipes/medical.toml train.max_steps=50 data.max_length=1024")
    parser.add_argument("recipe", help="path of the .toml recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override recipe keys; values are TOML literals (strings may be bare)")
    parser.add_argument("--dry-run", action="store_true",
                        help="load tokenizer and data, write preview.jsonl, show the first example; load no weights")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing a finished run in output.dir")
    parser.add_argument("--force", action="store_true",
                        help="train even if the VRAM plan says the run will not fit the GPU")
    return parser.parse_intermixed_args(argv)  # options may come before or after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print_user_error(error)
        return EXIT_USER_ERROR


def run(args: argparse.Namespace) -> int:
    # Heavy imports here, not at the top: `--help` and recipe errors answer instantly.
    from rich.console import Console

    from qlora_kit import artifacts, report
    from qlora_kit.data import load_rows, split_rows
    from qlora_kit.encode import Encoder, apply_length_policy, encode_rows
    from qlora_kit.recipe import load_recipe, recipe_to_toml
    from qlora_kit.render import make_renderer

    console = Console()
    quiet_libraries()
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.output.overwrite |= args.overwrite
    out = Path(recipe.output.dir)
    report.show_recipe(console, recipe_to_toml(recipe), args.recipe)
    if not args.dry_run:
        artifacts.prepare_output_dir(out, recipe.output.overwrite)

    from qlora_kit.model import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    rowset = load_rows(recipe.data)
    train_rows, eval_rows = split_rows(rowset.rows, recipe.data, recipe.train.seed)
    renderer, layout = make_renderer(tokenizer, recipe.data)
    encoder = Encoder(tokenizer, renderer)
    train_examples, lengths = apply_length_policy(encode_rows(encoder, train_rows), recipe.data.max_length,
                                                  recipe.data.over_length)
    eval_examples, _ = apply_length_policy(encode_rows(encoder, eval_rows), recipe.data.max_length, "drop")
    report.show_data(console, rowset, layout, len(train_rows), len(eval_rows), lengths, len(train_examples))
    if not train_examples:
        raise UserError(f"Every training row is longer than data.max_length = {recipe.data.max_length} tokens.",
                        hint=f"Raise data.max_length (the longest row has {lengths.percentiles['total']['max']}).")
    report.show_example(console, train_examples[0], tokenizer)
    check_memory_plan(recipe, console, force=args.force)

    if args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        artifacts.write_preview(train_examples[: recipe.output.preview_rows], out / artifacts.PREVIEW_FILE, tokenizer)
        console.print(f"[bold]dry run:[/] no weights loaded; {out / artifacts.PREVIEW_FILE} shows "
                      f"input_ids and labels of the first {recipe.output.preview_rows} examples.")
        return 0

    (out / artifacts.RECIPE_FILE).write_text(recipe_to_toml(recipe), encoding="utf-8")
    summary = train(recipe, tokenizer, train_examples, eval_examples, out, console)
    report.show_summary(console, summary, out)
    return 0


def check_memory_plan(recipe, console, force: bool) -> None:
    """Show the VRAM plan; on a GPU, refuse a run that clearly does not fit (the OOM would come later)."""
    import torch

    from qlora_kit.plan import make_plan, print_plan, read_architecture

    on_gpu = torch.cuda.is_available()
    vram_gib = torch.cuda.mem_get_info()[1] / 1024**3 if on_gpu else 8.0
    plan = make_plan(read_architecture(recipe.model), recipe, vram_gib)
    console.rule("[bold]memory plan" + ("" if on_gpu else " (no GPU here: shown for an 8 GiB GPU)"))
    print_plan(plan, console)
    if on_gpu and not plan.fits and not force:
        raise UserError(f"The plan says this run needs about {plan.peak_gib:.1f} GiB; this GPU has "
                        f"{vram_gib:.1f} GiB.", hint=f"Try {plan.suggestion}, or pass --force to try anyway.")


def train(recipe, tokenizer, train_examples, eval_examples, out: Path, console) -> dict:
    from qlora_kit import artifacts
    from qlora_kit.encode import to_dataset
    from qlora_kit.memory import snapshot
    from qlora_kit.model import add_lora, choose_precision, count_parameters, load_model
    from qlora_kit.status import StatusCallback
    from qlora_kit.train import build_trainer

    precision = choose_precision(recipe.quant)
    model = add_lora(load_model(recipe, precision), recipe.lora)
    trainable, total = count_parameters(model)
    label = "RANDOM-INIT weights (demo/benchmark, not a real model)" if recipe.model.init == "random" else "pretrained"
    console.print(f"model: {recipe.model.name} ({label}), {precision.describe()}; "
                  f"LoRA trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    metrics = artifacts.MetricsRecorder(out / artifacts.METRICS_FILE)
    status = StatusCallback(f"qlora_kit · {Path(recipe.model.name).name} · {label}", console)
    trainer = build_trainer(recipe, model, tokenizer, to_dataset(train_examples),
                            to_dataset(eval_examples) if eval_examples else None, precision, out,
                            [metrics, status])
    started = time.monotonic()
    try:
        result = trainer.train()
        final_eval = final_evaluation(trainer) if eval_examples else {}
    finally:
        status.close()
    wall = time.monotonic() - started

    trainer.model.save_pretrained(out / artifacts.ADAPTER_DIR)
    tokenizer.save_pretrained(out / artifacts.ADAPTER_DIR)
    artifacts.write_loss_curve(metrics.records, out / artifacts.CURVE_FILE,
                               f"{Path(recipe.model.name).name} · {label}")
    # TRL logs the running count of tokens it trained on (padding excluded) as num_tokens.
    tokens = max((r.get("num_tokens", 0) for r in metrics.records), default=0)
    losses = [r["loss"] for r in metrics.records if "loss" in r]
    mem = snapshot()
    summary = {
        "steps": trainer.state.global_step,
        "wall_time_s": round(wall, 1),
        "train_rows": len(train_examples),
        "tokens_per_s": round(tokens / wall, 1),
        f"peak_{mem.kind.lower()}_gib": round(mem.peak_gib, 3),
        "first_train_loss": round(losses[0], 4) if losses else None,
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "mean_train_loss": round(result.training_loss, 4),
        "final_eval_loss": round(final_eval["eval_loss"], 4) if "eval_loss" in final_eval else None,
        "trainable_parameters": trainable,
        "model_weights": label,
    }
    artifacts.write_json(out / artifacts.SUMMARY_FILE, summary)
    return summary


def final_evaluation(trainer) -> dict:
    """Eval loss of the finished adapter; reuses the last periodic evaluation if it ran at the final step."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if last and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def quiet_libraries() -> None:
    """Our status view says what matters; the libraries' progress bars and advice would bury it."""
    import logging
    import warnings

    # bitsandbytes advertises an optional CPU *inference* kernel on import; training never uses it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Deprecation notices about the libraries' own internals are for their authors, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)\.")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")


if __name__ == "__main__":
    sys.exit(main())
