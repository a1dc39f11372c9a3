""""Will it fit?": the planner's estimate (qlora_kit.plan.estimate, pure arithmetic on config.json) for the GPU found
or a card the user picks, as the page shows it: a gauge, the verdict, and the planner's advice when it does not fit.
On a machine without a GPU the run trains on the CPU: the page shows that machine's RAM and time plan first
(qlora_kit.plan.cpu), and the card's gauge under it, labelled as another machine's."""

from __future__ import annotations

import html
import shutil
import subprocess
from functools import cache

from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import Recipe

CARDS = (6, 8, 12, 16, 24)


@cache
def detected_gpu() -> tuple[str, float] | None:
    """(name, GiB) of the first NVIDIA GPU, asked of nvidia-smi: importing torch for this would cost the page seconds.
    None without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
        name, mib = out[0].rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def card_choices() -> list[str]:
    found = detected_gpu()
    return ([f"{found[0]} ({found[1]:.0f} GB, this machine)"] if found else []) + [f"{gib} GB" for gib in CARDS]


def card_gib(choice: str) -> float:
    found = detected_gpu()
    if found and choice.startswith(found[0]):
        return found[1]
    return float(choice.split()[0])


@cache
def _architecture(name: str, gguf_file: str, revision: str):
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.plan.estimate import read_architecture
    from qlora_kit.recipe.schema import ModelSection

    model = ModelSection(name=name, gguf_file=gguf_file, revision=revision)
    prepare_gguf_base(model, weights=False)  # a GGUF base: its config.json and tokenizer only, no weights
    return read_architecture(model)


def plan_html(recipe: Recipe, choice: str) -> str:
    """The gauge for `recipe` on the chosen card (after this CPU's plan on a machine without a GPU), or the planner's
    error (e.g. a model it cannot read)."""
    from qlora_kit.plan.estimate import make_plan

    try:
        arch = _architecture(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
        plan = make_plan(arch, recipe, card_gib(choice))
        cpu = "" if detected_gpu() else cpu_plan_html(arch, recipe)
    except UserError as error:
        return error_html(error)
    share = min(plan.peak_gib / plan.vram_gib, 1.0)
    colour = "#2e7d32" if plan.fits else "#c62828"
    verdict = "fits" if plan.fits else "does not fit"
    terms = "".join(f"<tr><td>{html.escape(term)}</td><td style='text-align:right'>{gib:.2f}</td></tr>"
                    for term, gib in plan.terms_gib.items() if gib >= 0.005)
    advice = "" if plan.fits else f"<p class='fit-advice'><b>Try:</b> {html.escape(plan.suggestion)}</p>"
    # On a machine without a GPU the card is another machine's: said before its gauge, under this CPU's plan.
    elsewhere = f"<p><b>On a {plan.vram_gib:g} GiB GPU (not this machine: it has no GPU)</b></p>" if cpu else ""
    return (f"{cpu}<div id='fit-gauge' data-fits='{str(plan.fits).lower()}'>{elsewhere}"
            f"<div style='background:#ddd;border-radius:4px;height:18px;width:100%'>"
            f"<div style='background:{colour};height:18px;border-radius:4px;width:{share * 100:.1f}%'></div></div>"
            f"<p><b class='fit-verdict' style='color:{colour}'>{verdict}</b>: about {plan.peak_gib:.2f} GiB at the "
            f"peak of a step on a {plan.vram_gib:g} GiB card ({plan.budget_gib:g} GiB usable after the desktop's "
            f"share); {plan.seq_len} tokens × batch {plan.batch}. Longest max_length at batch 1: "
            f"{plan.max_length_fit}.</p>{advice}"
            f"<details><summary>the terms (GiB)</summary><table>{terms}</table></details></div>")


@cache
def _rates(hidden: int, intermediate: int):
    """This CPU's rates, measured once per model shape and studio process (a quarter of a second): the form asks for
    the gauge at every change."""
    from qlora_kit.plan.cpu_time import measure_rates

    return measure_rates(hidden, intermediate)


def cpu_plan_html(arch, recipe: Recipe) -> str:
    """This machine's RAM gauge and time estimate for a run on its CPU (every row taken as max_length long: the page
    has not tokenized the rows)."""
    from qlora_kit.plan.cpu import make_cpu_plan
    from qlora_kit.plan.cpu_time import duration

    plan = make_cpu_plan(arch, recipe, rates=_rates(arch.hidden, arch.intermediate))
    share = min(plan.peak_gib / max(plan.available_ram_gib, 0.1), 1.0)
    colour = "#2e7d32" if plan.fits else "#c62828"
    verdict = "fits" if plan.fits else "does not fit"
    terms = "".join(f"<tr><td>{html.escape(term)}</td><td style='text-align:right'>{gib:.2f}</td></tr>"
                    for term, gib in plan.terms_gib.items() if gib >= 0.005)
    timing = ""
    if plan.time:
        t = plan.time
        timing = (f"<p class='cpu-time'><b>Time</b>: about {duration(t.total_s)} (likely {duration(t.low_s)} to "
                  f"{duration(t.high_s)}): training {duration(t.train_s)} ({t.steps} steps at about "
                  f"{t.train_tokens_per_s:.0f} tokens/s, this CPU's rate measured now), evaluations "
                  f"{duration(t.eval_s)}, sample replies up to {duration(t.samples_s)}. Every row is taken as "
                  f"max_length long: an upper bound.</p>")
    return (f"<div id='cpu-plan' data-fits='{str(plan.fits).lower()}'>"
            f"<p><b>This machine has no GPU: the run trains on its CPU</b></p>"
            f"<div style='background:#ddd;border-radius:4px;height:18px;width:100%'>"
            f"<div style='background:{colour};height:18px;border-radius:4px;width:{share * 100:.1f}%'></div></div>"
            f"<p><b class='cpu-verdict' style='color:{colour}'>{verdict}</b> in RAM: about {plan.peak_gib:.2f} GiB "
            f"at the peak ({html.escape(plan.peak_moment)}) of the {plan.available_ram_gib:g} GiB free; gradient "
            f"checkpointing {html.escape(plan.checkpointing_reason)}.</p>{timing}"
            f"<details><summary>the RAM terms (GiB)</summary><table>{terms}</table></details></div>")


def error_html(error: UserError) -> str:
    return f"<pre class='studio-error'>{html.escape(error.render())}</pre>"
