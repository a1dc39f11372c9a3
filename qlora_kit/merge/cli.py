"""The command line: arguments, and `merge()`, the whole flow from run directory to published folder, step by
step in the order it runs (the package docstring maps each step to its module)."""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import time
from pathlib import Path

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.merge.adapter import read_adapter
from qlora_kit.merge.base import locate_base
from qlora_kit.merge.checks import (
    check_free_disk,
    check_output_dir,
    expected_architecture,
    local_inputs,
)
from qlora_kit.merge.model_files import tokenizer_source, write_model_files
from qlora_kit.merge.plan import plan_merge
from qlora_kit.merge.run_dir import read_run
from qlora_kit.merge.shards import DTYPES, write_merged_shards
from qlora_kit.merge.sizes import estimated_output_bytes
from qlora_kit.merge.staging import staging_dir
from qlora_kit.merge.verify import verify_if_it_fits
from qlora_kit.recipe.run_files import RECIPE_FILE
from qlora_kit.recipe.schema import TRAINING_RECIPE_FILE

EXIT_VERIFICATION_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        # tools/merge.py, `python -m qlora_kit.merge` and `qlora-kit merge` are the same command: name the one typed.
        prog=command_name("python tools/merge.py" if Path(sys.argv[0]).name == "merge.py"
                          else "python -m qlora_kit.merge"),
        description="Merge a run's LoRA adapter into its base model's weights, shard by shard.",
        epilog="examples:\n  python tools/merge.py runs/medical\n"
               "  python tools/merge.py runs/medical --out merged/ --dtype bfloat16\n"
               "  python tools/merge.py runs/medical --into original",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory (holds adapter/ and recipe.toml)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/merged)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="dtype of the merged weights (default: float16, whatever the base was trained in: "
                             "what llama.cpp, Ollama and older GPUs read; bfloat16 keeps a bf16 base's range)")
    parser.add_argument("--into", choices=("original", "dequantized"), default=None,
                        help="dequantized (default for a run that trained on a 4-bit base): the NF4 round trip of "
                             "the base, i.e. the weights the adapter was trained against, so the merged model is "
                             "the trained one. original (default for a 16-bit LoRA run): the 16-bit base weights")
    parser.add_argument("--base", help="take base weights from this local folder or hub id instead of the recipe's")
    parser.add_argument("--revision", default="main", help="hub revision for --base (default: main)")
    parser.add_argument("--max-shard-size", type=parse_size, default="1GB", metavar="SIZE",
                        help="largest output shard, e.g. 500MB or 2GB (default 1GB); peak RAM grows with it")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing merged logits with PEFT's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged model in --out")
    return parser.parse_args(argv)


def parse_size(text: str) -> int:
    """'1GB', '500MB', '100KB' or a byte count -> bytes (decimal units, as transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match[2]]
    return int(float(match[1]) * unit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return merge(args)
    except UserError as error:
        print_user_error(error)
        return getattr(error, "exit_code", EXIT_USER_ERROR)


def merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line in logs
    quiet_libraries()
    started = time.monotonic()
    run = read_run(Path(args.run_dir))
    adapter = read_adapter(run.adapter_dir, run.recipe.model.allow_pickle_weights)
    out = Path(args.out) if args.out else run.dir / "merged"
    dtype_name = args.dtype
    check_output_dir(out, args.overwrite, protected=[run.dir, *local_inputs(run.recipe, args.base)])

    with contextlib.ExitStack() as stack:
        base = locate_base(run.recipe, args.base, args.revision, stack, console)
        expected = expected_architecture(run.recipe) if args.base else None
        plan = plan_merge(run.recipe, base, adapter, args.into, expected)
        tokenizer_dir = tokenizer_source(run, base, console)
        check_free_disk(out, estimated_output_bytes(base, DTYPES[dtype_name], tokenizer_dir))

        console.print(f"[bold]merge mode:[/] {plan.describe()}")
        console.print(f"[bold]adapter:[/] {adapter.describe()}")
        with staging_dir(out) as stage:
            index = write_merged_shards(base, adapter, plan, stage, DTYPES[dtype_name], args.max_shard_size, console)
            write_model_files(base, stage, dtype_name, index, tokenizer_dir)
            shutil.copyfile(run.dir / RECIPE_FILE, stage / TRAINING_RECIPE_FILE)  # the prompt format travels along
            merge_peak = peak_rss_gib()
            merge_wall = time.monotonic() - started
            console.print(f"merged {len(index['weight_map'])} tensors into {len(set(index['weight_map'].values()))} "
                          f"shard(s) in {merge_wall:.1f} s, peak RAM so far {merge_peak:.2f} GiB")
            verification = None if args.no_verify else verify_if_it_fits(run, base, adapter, plan, stage, dtype_name,
                                                                         console)
            from qlora_kit.merge.card import write_model_card

            write_model_card(stage / "README.md", run=run, base=base, adapter=adapter, plan=plan,
                             dtype_name=dtype_name, verification=verification)
        console.print(f"[bold green]written:[/] {out}")
    print_gguf_advice(base.config, out, console)
    wall = time.monotonic() - started
    loads = "" if verification is None else "; verification loads whole models"
    console.print(f"done in {wall:.1f} s · peak RAM {peak_rss_gib():.2f} GiB (merge alone {merge_peak:.2f} GiB{loads})")
    if verification is not None and not verification.passed:
        console.print("[bold red]verification FAILED:[/] the merged model's logits differ from PEFT's beyond the "
                      "tolerance; the folder is written for inspection, do not ship it.")
        return EXIT_VERIFICATION_FAILED
    return 0


def print_gguf_advice(config: dict, out: Path, console) -> None:
    """Which GGUF type to export for which card (file size + KV cache), for the architectures the export writes."""
    from qlora_kit.plan.gguf_sizes import advice_lines

    for line in advice_lines(config, str(out)):
        console.print(line)


def quiet_libraries() -> None:
    """Our progress bar and summary say what matters; the libraries' own bars and advice would bury them."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft still calls a transformers method deprecated for v6; nothing a user of merge can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (its own, not a parent's: qlora_kit.train.memory_use)."""
    import psutil

    from qlora_kit.train.memory_use import peak_rss_bytes

    return (peak_rss_bytes() or psutil.Process().memory_info().rss) / 1024**3
