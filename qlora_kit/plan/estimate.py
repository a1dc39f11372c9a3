"""Will it fit? The VRAM plan of a recipe before any weight is loaded, and `python -m qlora_kit.plan`.

`python -m qlora_kit.plan RECIPE [key=value ...] [--gpu 8] [--json]`

On a GPU machine: the peak of a training step on the card (qlora_kit.plan.peak), whether it fits, the longest
max_length that does, and which knob to turn when it does not. On a machine without a GPU the command prints the
CPU plan instead (qlora_kit.plan.cpu: RAM and time of a run on this CPU), and this VRAM plan only with --gpu.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.plan.peak import (  # noqa: F401  (re-exported: the planner's names, where callers import them)
    GIB,
    PROFILES,
    Architecture,
    Estimate,
    StepProfile,
    estimate,
    lora_parameters,
    optimizer_state_bytes,
    read_architecture,
    read_config,
    saved_activations,
)
from qlora_kit.recipe.schema import Recipe

DESKTOP_GIB = 0.5  # what the display and other processes keep on a laptop GPU


@dataclass
class Plan:
    model: str
    vram_gib: float
    budget_gib: float
    seq_len: int
    batch: int
    peak_gib: float
    """Everything on the card at the step's peak, the CUDA context included: what decides whether the run fits."""
    reserved_gib: float
    """What torch.cuda.max_memory_reserved() will read at the peak: peak_gib without the CUDA context (the driver's
    and kernels' memory, which PyTorch's allocator does not count), so it is always the smaller figure."""
    fits: bool
    max_length_fit: int
    suggestion: str
    terms_gib: dict[str, float]
    phases_gib: dict[str, float]
    """Each candidate peak of a step (with the activations it sees); the terms show the largest."""
    context_bound: bool = False
    """max_length_fit is the model's max_position_embeddings: more would fit in memory."""


def make_plan(arch: Architecture, recipe: Recipe, vram_gib: float) -> Plan:
    budget = vram_gib - DESKTOP_GIB
    est = estimate(arch, recipe)
    seq, batch = recipe.data.max_length, recipe.train.batch_size
    fits = est.total / GIB <= budget
    longest = _longest_fitting(arch, recipe, budget)
    if fits:
        suggestion = "fits as configured"
    elif recipe.train.method == "grpo":
        from qlora_kit.plan.grpo import grpo_suggestion

        suggestion = grpo_suggestion(arch, recipe, budget, estimate)
    elif estimate(arch, recipe, seq, 1).total / GIB <= budget:
        # A divisor of the effective batch, so that batch x accumulation stays exactly what the recipe asked for.
        total = batch * recipe.train.grad_accum
        best = max(b for b in range(1, batch + 1)
                   if total % b == 0 and estimate(arch, recipe, seq, b).total / GIB <= budget)
        suggestion = f"train.batch_size={best} train.grad_accum={total // best} (same effective batch)"
    else:
        suggestion = _shorter_or_switched(arch, recipe, budget, longest)
        if batch > 1:  # every figure above is at batch 1
            suggestion = (f"train.batch_size=1 train.grad_accum={batch * recipe.train.grad_accum} and "
                          f"{suggestion}")
    return Plan(arch.name, vram_gib, round(budget, 3), seq, batch, round(est.total / GIB, 3),
                round(est.reserved / GIB, 3), fits, longest, suggestion,
                {k: round(v / GIB, 3) for k, v in est.terms.items()},
                {k: round(v / GIB, 3) for k, v in est.phases.items()},
                context_bound=bool(longest) and longest + 16 > arch.max_positions)


def _shorter_or_switched(arch: Architecture, recipe: Recipe, budget: float, longest: int) -> str:
    """The knobs for a run that does not fit at batch 1: the fewest [memory] switches that make it fit (they keep
    every row), and the longest max_length that fits (which drops the longer rows), with and without them."""
    too_short = "does not fit at a useful length: use a smaller model (or a GPU with more memory)"
    shorter = (f"data.max_length={longest} (the longest that fits at batch 1)"
               if longest >= USEFUL_MIN_LENGTH else "")
    sets = _switch_sets(recipe)
    for names, candidate in sets:  # the fewest, cheapest switches first
        gib = estimate(arch, candidate, recipe.data.max_length, 1).total / GIB
        if gib <= budget:
            return f"{_overrides(names)} (then about {gib:.1f} GiB at batch 1)" + (f", or {shorter}" if shorter else "")
    for names, candidate in sets[-1:]:  # all of them
        longest_switched = _longest_fitting(arch, candidate, budget)
        if longest_switched > longest and longest_switched >= USEFUL_MIN_LENGTH:
            return ((f"{shorter}, or " if shorter else "") + f"{_overrides(names)} data.max_length={longest_switched} "
                    "(the longest with the memory switches on)")
    return shorter or too_short


USEFUL_MIN_LENGTH = 256
"""Below this a suggested max_length would drop nearly every reasoning row (their CoT alone is hundreds of
tokens): the plan says the model does not fit instead."""
MEMORY_SWITCHES = ("tiled_mlp", "offload_activations", "embeddings_on_cpu")
"""Cheapest first: extra compute on the GPU, then activation copies to RAM, then a ~1 GB copy per micro-batch."""


def _overrides(names: tuple[str, ...]) -> str:
    return " ".join(f"memory.{name}=true" for name in names)


def _switch_sets(recipe: Recipe) -> list[tuple[tuple[str, ...], Recipe]]:
    """Every combination of the [memory] switches still off, fewest first (cheapest first among equals), each with
    the recipe it makes. Tiling is left out under FSDP, which refuses it."""
    from itertools import combinations

    off = [name for name in MEMORY_SWITCHES if not getattr(recipe.memory, name)
           and not (name == "tiled_mlp" and recipe.distributed.fsdp)
           and not (name == "offload_activations" and recipe.train.method == "orpo")]  # refused there
    return [(names, replace(recipe, memory=replace(recipe.memory, **dict.fromkeys(names, True))))
            for size in range(1, len(off) + 1) for names in combinations(off, size)]


def _longest_fitting(arch: Architecture, recipe: Recipe, budget_gib: float) -> int:
    """Longest sequence (batch 1, multiple of 16, at most the model's context) that fits the budget; 0 if none."""
    def fits(n):
        return n <= arch.max_positions and estimate(arch, recipe, n, 1).total / GIB <= budget_gib

    if not fits(16):
        return 0
    low, high = 16, 16
    while fits(high * 2):
        high *= 2
    low, high = high, high * 2
    while high - low > 16:
        mid = (low + high) // 2 // 16 * 16
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def print_plan(plan: Plan, console=None) -> None:
    from rich.table import Table

    from qlora_kit.console import make_console

    console = console or make_console()
    from rich.text import Text

    # Its own line, not the table's title: a title wraps at the table's width, cutting a long model path in two.
    console.print(Text.assemble(("VRAM plan", "bold"), f": {plan.model}, {plan.seq_len} tokens x batch {plan.batch}"),
                  soft_wrap=True)
    table = Table()
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term, gib in plan.terms_gib.items():
        table.add_row(term, f"{gib:.3f}")
    table.add_row("[bold]peak on the card", f"[bold]{plan.peak_gib:.2f}")
    console.print(table)
    peak = max(plan.phases_gib, key=plan.phases_gib.get)
    others = ", ".join(f"{name} {gib:.2f} GiB" for name, gib in plan.phases_gib.items() if name != peak)
    console.print(f"[dim]The peak comes with the {peak}; other moments of the step, never at the same time "
                  f"(each with the activations it sees): {others}.")
    verdict = "[bold green]fits" if plan.fits else "[bold red]does not fit"
    # The search stops at the model's context length; say so, or it reads as a memory limit.
    capped = " (the model's context length, not memory, is the limit)" if plan.context_bound else ""
    console.print(f"{verdict}[/] a GPU with {plan.vram_gib:g} GiB ({plan.budget_gib:g} GiB usable after "
                  f"{DESKTOP_GIB} GiB for the desktop); longest max_length at batch 1: {plan.max_length_fit}{capped}; "
                  f"{plan.suggestion}")


def main(argv: list[str] | None = None) -> int:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name("python -m qlora_kit.plan"),
        description="Will the recipe fit, before any weight loads? On a GPU machine: the VRAM plan. On a machine "
                    "without a GPU: the RAM and time plan of a CPU run (qlora_kit.plan.cpu), and the VRAM plan of "
                    "a GPU only with --gpu.",
        epilog="exit status: 0 when the run fits (the GPU, or this CPU machine's RAM), 1 when it does not, 2 for a "
               "problem in the recipe")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--gpu", "--vram-gib", dest="vram_gib", type=float, default=None, metavar="GIB",
                        help="the VRAM plan for a GPU with this many GiB (default on a GPU machine: 8; on a machine "
                             "without one: the CPU plan only)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    if args.vram_gib is not None and args.vram_gib <= DESKTOP_GIB:
        parser.error(f"--gpu must be more than the {DESKTOP_GIB} GiB the planner leaves to the desktop, "
                     f"got {args.vram_gib:g}")
    try:
        from qlora_kit.model.gguf_base import prepare_gguf_base
        from qlora_kit.recipe.loading import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        prepare_gguf_base(recipe.model, weights=False)  # a GGUF base: its config.json, no weights
        arch = read_architecture(recipe.model)
        asked_gpu = args.vram_gib is not None
        # --json prints one plan: the GPU's when asked for, else this machine's.
        cpu = None if (asked_gpu and args.json) or _has_gpu() else _cpu_plan(arch, recipe)
        plan = make_plan(arch, recipe, args.vram_gib or 8.0) if asked_gpu or cpu is None else None
    except UserError as error:
        print_user_error(error)
        return EXIT_USER_ERROR
    verdict = plan if plan else cpu  # the exit status answers the question asked: that GPU, or this machine
    if args.json:
        print(json.dumps({**asdict(plan), "about": PLAN_FIELDS_EXPLAINED} if plan else cpu.as_dict(), indent=2))
        return 0 if verdict.fits else 1
    from qlora_kit.console import make_console

    console = make_console()
    if cpu:
        from qlora_kit.plan.cpu import print_cpu_plan

        print_cpu_plan(cpu, console)
    if plan:
        if cpu:  # another machine's figures: said so before the table, not after it
            console.rule(f"[bold]for a {plan.vram_gib:g} GiB GPU (not this machine)")
        print_plan(plan, console)
    return 0 if verdict.fits else 1


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_plan(arch: Architecture, recipe: Recipe):
    from qlora_kit.plan.cpu import make_cpu_plan

    return make_cpu_plan(arch, recipe)


PLAN_FIELDS_EXPLAINED = {
    "peak_gib": "everything on the card at the step's peak, CUDA context included: compared with budget_gib",
    "reserved_gib": "what torch.cuda.max_memory_reserved() should read at that peak: peak_gib minus the CUDA context, "
                    "which PyTorch's allocator does not count",
    "budget_gib": "vram_gib minus what the desktop and other programs are assumed to hold",
    "max_length_fit": "the longest data.max_length that fits at batch 1",
}
"""--json's "about": what the figures mean, for a reader without the README."""


if __name__ == "__main__":
    sys.exit(main())
