"""`report.md`: one page per finished run that says what was trained, on what, how it went and what came out.

    report.md         recipe, data statistics, summary, the curves, throughput, base vs fine-tuned answers
    memory_speed.png  memory (VRAM on a GPU, RAM on a CPU) and tokens/s over the steps

It is written from the run directory's own files (metrics.jsonl is the record of every logged step, resumed
runs included) plus what only the run knows (the data report, the samples), so it renders anywhere Markdown
does: a code host, an editor, a notebook. (The terminal output is report.py's job.)
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.recipe.run_files import (
    CURVE_FILE,
    MEMORY_SPEED_FILE,
    METRICS_FILE,
    REPORT_FILE,
    REWARD_CURVE_FILE,
    SAMPLES_FILE,
)
from qlora_kit.results.markdown import fenced, one_line, quoted, table_cell
from qlora_kit.results.samples import Sample
from qlora_kit.train import base_eval
from qlora_kit.train.artifacts import read_records
from qlora_kit.train.summary import outcome_lines


def throughput(records: list[dict]) -> list[tuple[int, float]]:
    """(step, tokens/s) between consecutive logged steps: TRL's running token count over the wall time. An interval
    with an evaluation in it is left out: its time is not training."""
    speeds, previous = [], None
    for record in records:
        if "eval_loss" in record:
            previous = None
        elif "num_tokens" in record and "time_s" in record:
            if previous and record["time_s"] > previous["time_s"] and record["num_tokens"] >= previous["num_tokens"]:
                speeds.append((record["step"], (record["num_tokens"] - previous["num_tokens"]) /
                               (record["time_s"] - previous["time_s"])))
            previous = record
    return speeds


def memory_kind(records: list[dict]) -> str:
    """`VRAM` or `RAM`, as the run's metrics recorded it."""
    return "VRAM" if any("vram_used_gib" in r for r in records) else "RAM"


def write_memory_speed(records: list[dict], path: Path, title: str) -> bool:
    """Memory in use and its peak, and tokens/s, against the step. False when nothing was logged."""
    kind = memory_kind(records).lower()
    memory = [(r["step"], r[f"{kind}_used_gib"], r[f"{kind}_peak_gib"]) for r in records if f"{kind}_used_gib" in r]
    speed = throughput(records)
    if not memory:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed: CI, servers, nohup
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=110, sharex=True)
    steps, used, peak = zip(*memory, strict=True)
    if kind == "vram":
        used_label, peak_label, axis = "allocated by tensors", "peak reserved (decides an OOM)", "VRAM, GiB"
    else:
        used_label, peak_label, axis = "resident now", "peak resident", "RAM of the process, GiB"
    # On a CPU in-use and peak are nearly equal: the peak is drawn on top, dashed, and the axis leaves headroom so
    # neither line runs along the frame.
    top.plot(steps, used, color="tab:green", linewidth=3, alpha=0.6, label=used_label, zorder=2)
    top.plot(steps, peak, color="tab:red", linestyle="--", linewidth=1.5, label=peak_label, zorder=3)
    top.set_ylabel(axis)
    top.set_ylim(bottom=0, top=max(peak) * 1.2 or 1)
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    top.set_title(title, fontsize=10)
    if speed:
        bottom.plot(*zip(*speed, strict=True), color="tab:purple", linewidth=1.5)
    bottom.set_ylabel("tokens/s (trained + prompt)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(run_dir: Path, *, title: str, command: str, recipe_toml: str, data_report: list[str],
                 summary: dict, samples: list[Sample], planned_reserved_gib: float | None = None,
                 judged_lines: list[str] = ()) -> Path:
    """Write report.md (and memory_speed.png) into the run directory; returns the report's path. A GRPO run adds
    its reward section (reward_curve.png) and `judged_lines`, its before -> after on held-out rows."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / METRICS_FILE)
    has_memory_plot = write_memory_speed(records, run_dir / MEMORY_SPEED_FILE, title)
    lines = [f"# Run report: {title}", "", f"Command: `{command}`", "", "## Summary", ""]
    lines += [f"**{line.strip()}**  " for line in outcome_lines(summary)]
    lines += ["", "| | |", "| --- | --- |"]
    lines += [f"| {key.replace('_', ' ')} | {format_value(value)} |" for key, value in summary.items()]
    lines += reward_lines(records, judged_lines, (run_dir / REWARD_CURVE_FILE).is_file())
    lines += ["", "## Loss", "", f"![train and eval loss]({CURVE_FILE})", ""]
    lines += loss_lines(records)
    lines += ["## Memory and throughput", ""]
    if has_memory_plot:
        lines += [f"![memory and tokens/s over the steps]({MEMORY_SPEED_FILE})", ""]
    lines += resource_lines(records, planned_reserved_gib, summary.get("tokens_per_s"))
    lines += ["## Data", "", fenced("\n".join(data_report)), ""]
    lines += sample_lines(samples)
    lines += ["## Recipe", "", "Everything this run used, defaults included (also in `recipe.toml`).", "",
              fenced(recipe_toml.rstrip(), "toml"), ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def reward_lines(records: list[dict], judged_lines: list[str], has_plot: bool) -> list[str]:
    """GRPO: the reward over the steps (plot and first/last), and the held-out rows judged before -> after."""
    if any(r.get("rewards/margins") is not None for r in records):
        return preference_lines(records, judged_lines, has_plot)
    logged = [r for r in records if r.get("reward") is not None]
    if not logged and not judged_lines:
        return []
    lines = ["", "## Reward (GRPO)", ""]
    if has_plot:
        lines += [f"![reward over the steps]({REWARD_CURVE_FILE})", ""]
    if logged:
        lines.append(f"- training reward: {logged[0]['reward']:.3f} at step {logged[0]['step']} → "
                     f"{logged[-1]['reward']:.3f} at step {logged[-1]['step']} ({len(logged)} logged steps; each "
                     "the mean over that step's completions)")
        clipped = [r["completions/clipped_ratio"] for r in logged if r.get("completions/clipped_ratio") is not None]
        if clipped:
            lines.append(f"- completions cut at grpo.max_completion_length: {clipped[0]:.0%} → {clipped[-1]:.0%}")
    lines += [f"- judged: {line}" for line in judged_lines]
    if judged_lines:
        lines.append(f"- every judged completion with its rewards: [{SAMPLES_FILE}]({SAMPLES_FILE})")
    return lines


def preference_lines(records: list[dict], judged_lines: list[str], has_plot: bool) -> list[str]:
    """DPO / KTO / ORPO: TRL's implicit rewards over the steps (plot, first and last logged step), and the held-out
    rows ranked before -> after by the model's own log-probabilities."""
    logged = [r for r in records if r.get("rewards/margins") is not None and r.get("step", 0) > 0]
    lines = ["", "## Preference (chosen against rejected)", ""]
    if has_plot:
        lines += [f"![rewards over the steps]({REWARD_CURVE_FILE})", ""]
    if logged:
        first, last = logged[0], logged[-1]
        lines.append(f"- training margin (beta x log-ratio, chosen - rejected): {first['rewards/margins']:+.3f} at "
                     f"step {first['step']} → {last['rewards/margins']:+.3f} at step {last['step']}")
        if last.get("rewards/accuracies") is not None:
            lines.append(f"- chosen rewarded higher in the step's batch: {first['rewards/accuracies']:.0%} → "
                         f"{last['rewards/accuracies']:.0%}")
    lines += [f"- judged: {line}" for line in judged_lines]
    return lines


def loss_lines(records: list[dict]) -> list[str]:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    lines = []
    if train:
        lines.append(f"- train loss: {train[0]['loss']:.4f} at step {train[0]['step']} → "
                     f"{train[-1]['loss']:.4f} at step {train[-1]['step']} ({len(train)} logged steps)")
    if evals:
        sixteen = next((r for r in records if r["step"] == 0 and f"{base_eval.PREFIX}_loss" in r), None)
        quantized = sixteen is not None or any(base_eval.NOT_MEASURED in r for r in records)
        for key, what in (("loss", "eval loss on the held-out rows"),
                          ("answer_loss", "eval loss on the answer tokens alone")):
            points = [f"{r[f'eval_{key}']:.4f} (step {r['step']}{', NF4 base' if quantized and not r['step'] else ''})"
                      for r in evals if f"eval_{key}" in r]
            if sixteen and f"{base_eval.PREFIX}_{key}" in sixteen:
                points.insert(0, f"{sixteen[f'{base_eval.PREFIX}_{key}']:.4f} (16-bit base)")
            if points:
                lines.append(f"- {what}: {', '.join(points)}")
    return [*lines, ""] if lines else []


def resource_lines(records: list[dict], planned_reserved_gib: float | None = None,
                   whole_run_tokens_per_s: float | None = None) -> list[str]:
    kind = memory_kind(records)
    peaks = [r[f"{kind.lower()}_peak_gib"] for r in records if f"{kind.lower()}_peak_gib" in r]
    speed = [tokens_per_s for _, tokens_per_s in throughput(records)]
    lines = []
    if peaks:
        what = "peak reserved by the CUDA allocator" if kind == "VRAM" else "peak resident memory of the process"
        lines.append(f"- {kind}: {what} {max(peaks):.2f} GiB")
        if planned_reserved_gib and kind == "VRAM":
            # Every GPU run is a check of the planner: the same figure it predicted before loading a weight.
            error = planned_reserved_gib / max(peaks) - 1
            lines.append(f"- planner, before training: {planned_reserved_gib:.2f} GiB reserved ({error:+.0%} of the "
                         "measured peak)")
    if whole_run_tokens_per_s:
        lines.append(f"- throughput over the whole training: {whole_run_tokens_per_s:,.0f} tokens/s (summary.json's "
                     "`tokens_per_s`: every trained token over the wall time minus the evaluations, so the slow "
                     "first steps, checkpoint saves and logging count)")
    if speed:
        ordered = sorted(speed)
        lines.append(f"- throughput between logged steps: median {ordered[len(ordered) // 2]:,.0f} tokens/s "
                     f"(min {ordered[0]:,.0f}, max {ordered[-1]:,.0f}): the steady pace, as the status view shows it")
    return [*lines, ""] if lines else []


def sample_lines(samples: list[Sample]) -> list[str]:
    if not samples:
        return []
    lines = ["## Base vs fine-tuned", "",
             f"The answers only; [{SAMPLES_FILE}]({SAMPLES_FILE}) has the reasoning of each and how they were "
             "decoded.", ""]
    for number, sample in enumerate(samples, start=1):
        lines += [f"### {number}. {one_line(sample.row.question, 80)}", "", quoted(sample.row.question), "",
                  "| | answer |", "| --- | --- |",
                  f"| reference | {table_cell(sample.row.response)} |",
                  f"| base | {table_cell(sample.base.answer) or '_(no answer)_'} |",
                  f"| fine-tuned | {table_cell(sample.tuned.answer) or '_(no answer)_'} |", ""]
    return lines


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)
