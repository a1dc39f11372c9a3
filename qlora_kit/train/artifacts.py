"""What a run leaves behind in its output directory (the names: qlora_kit.recipe.run_files), and the guard that
keeps finished runs safe."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from qlora_kit.data.encode import Example
from qlora_kit.errors import UserError
from qlora_kit.recipe.run_files import (
    ADAPTER_DIR,
    FINISHED_RUN_FILES,
    RECIPE_FILE,
    SUMMARY_FILE,
)
from qlora_kit.train.memory_use import snapshot


def prepare_output_dir(directory: Path, recipe, overwrite: bool, restart: bool,
                       change: bool = True) -> tuple[Path | None, int]:
    """Make the run directory ready. Returns the checkpoint to resume from (or None) and its step.

    A finished run is never replaced without --overwrite. An unfinished one with a checkpoint is
    resumed, unless the recipe changed in a way that matters (then we refuse and show how) or the
    user asked to --restart. Only this directory's own checkpoints are ever deleted, and only when
    `change` is set (rank 0 of a multi-process run; the other ranks only check).
    """
    from qlora_kit.recipe.loading import load_recipe
    from qlora_kit.recipe.run_files import CHECKPOINT_DIR
    from qlora_kit.train.checkpoints import latest_valid_checkpoint, recipe_differences

    finished = refuse_finished_run(directory, overwrite)
    checkpoint, step = latest_valid_checkpoint(directory)
    if finished or restart or not checkpoint:
        if change:
            shutil.rmtree(directory / CHECKPOINT_DIR, ignore_errors=True)
            if finished:  # --overwrite: from here on an ordinary unfinished run, which an interrupt can resume
                remove_finished_run(directory)
            directory.mkdir(parents=True, exist_ok=True)
        return None, 0
    saved = directory / RECIPE_FILE
    changes = recipe_differences(load_recipe(saved), recipe) if saved.is_file() else []
    if changes:
        raise UserError(f"{directory} holds an unfinished run (checkpoint at step {step}) trained with a "
                        "different recipe:", changes,
                        hint="Run it with the same settings to resume, pass --restart to start over in this "
                             "directory, or choose another output.dir.")
    return checkpoint, step


def remove_finished_run(directory: Path) -> None:
    for name in FINISHED_RUN_FILES:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def refuse_finished_run(directory: Path, overwrite: bool) -> list[str]:
    """Raise unless `directory` is free or replacing it was asked for; returns the finished run's files."""
    finished = [name for name in (ADAPTER_DIR, SUMMARY_FILE) if (directory / name).exists()]
    if finished and not overwrite:
        raise UserError(f"{directory} already holds a finished run ({', '.join(finished)}).",
                        hint=f"Choose another output.dir (e.g. output.dir={directory}-2), or pass --overwrite "
                             "to replace it.")
    return finished


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short (the process killed mid-write, a full disk) is left out."""
    from qlora_kit.jsonl import read_jsonl

    return [record for record in read_jsonl(path) if "step" in record]


class LogFinalStep(TrainerCallback):
    """Log the last step whatever train.logging_steps says, so the final train loss in summary.json and
    report.md is the last step's. Every rank needs it: logging gathers the loss across ranks."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True


class MetricsRecorder(TrainerCallback):
    """Appends every log (train and eval) to metrics.jsonl, with time and memory, as it happens:
    a run that dies still leaves its curve behind."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        # A resumed run keeps the records up to its checkpoint and continues the same file.
        self.records = [r for r in read_records(path) if r["step"] <= resume_step] if resume_step else []
        # ... and its clock: time_s runs on from the checkpoint, so throughput across the resume stays right. It
        # starts with the first step: the eval before training is logged at 0 s and not counted as training time.
        self.clock_offset = max((r.get("time_s", 0.0) for r in self.records), default=0.0)
        self.started: float | None = None
        # TRL counts trained tokens (num_tokens) from 0 in every process, resumed or not; the file stays
        # cumulative over the whole run, so a resumed run continues from the count at its checkpoint.
        self.token_offset = max((r.get("num_tokens", 0) for r in self.records), default=0)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic() - self.clock_offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        mem = snapshot()
        elapsed = time.monotonic() - self.started if self.started is not None else self.clock_offset
        self.append({"step": state.global_step, "time_s": round(elapsed, 3),
                     **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))},
                     **({"num_tokens": logs["num_tokens"] + self.token_offset} if "num_tokens" in (logs or {}) else {}),
                     f"{mem.kind.lower()}_used_gib": round(mem.used_gib, 4),
                     f"{mem.kind.lower()}_peak_gib": round(mem.peak_gib, 4)})

    def append(self, record: dict) -> None:
        """One record, to memory and to the file at once (also those the trainer does not log: the 16-bit base)."""
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_loss_curve(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed: CI, servers, nohup
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
        ax.plot(steps, centered_mean(losses), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval loss")
    from qlora_kit.train.base_eval import PREFIX

    sixteen = next((r[f"{PREFIX}_loss"] for r in records if r["step"] == 0 and f"{PREFIX}_loss" in r), None)
    if sixteen is not None:  # a 4-bit run's eval starts from the NF4 base; the model the user had is this line
        ax.axhline(sixteen, color="tab:gray", linestyle=":", linewidth=1.5, label="eval loss of the 16-bit base")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reward_curve(records: list[dict], path: Path, title: str) -> bool:
    """GRPO: the mean reward of each logged step (raw and smoothed, with its spread across completions) and each
    reward function's mean. False when no step logged a reward."""
    logged = [r for r in records if r.get("reward") is not None]
    if not logged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in logged]
    rewards = [r["reward"] for r in logged]
    spread = [r.get("reward_std") or 0.0 for r in logged]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.fill_between(steps, [m - s for m, s in zip(rewards, spread, strict=True)],
                    [m + s for m, s in zip(rewards, spread, strict=True)], color="tab:green", alpha=0.12,
                    label="± std across completions")
    ax.plot(steps, rewards, color="tab:green", alpha=0.35, linewidth=1, label="reward (weighted sum)")
    ax.plot(steps, centered_mean(rewards), color="tab:green", linewidth=2, label="reward (smoothed)")
    names = sorted({key.split("/")[1] for r in logged for key in r if key.startswith("rewards/")
                    and key.endswith("/mean")})
    for name in names:
        points = [(r["step"], r[f"rewards/{name}/mean"]) for r in logged if r.get(f"rewards/{name}/mean") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), linewidth=1, linestyle="--", label=f"{name} (mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_preference_curve(records: list[dict], path: Path, title: str) -> bool:
    """DPO / KTO / ORPO: TRL's implicit rewards of the chosen and rejected sides and their margin (left axis), and
    the share of pairs whose chosen side gets the higher reward (right axis), over the steps. False when no step
    logged them."""
    logged = [r for r in records if r.get("rewards/chosen") is not None and r.get("step", 0) > 0]
    if not logged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in logged]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, color, name in (("rewards/chosen", "tab:green", "chosen"), ("rewards/rejected", "tab:red", "rejected"),
                             ("rewards/margins", "tab:blue", "margin (chosen - rejected)")):
        values = [r.get(key) for r in logged]
        if None in values:
            continue
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, centered_mean(values), color=color, linewidth=2, label=f"{name} (smoothed)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("implicit reward (beta x log-ratio to the reference)")
    if all(r.get("rewards/accuracies") is not None for r in logged):
        share = ax.twinx()
        share.plot(steps, centered_mean([r["rewards/accuracies"] for r in logged]), color="black", linestyle="--",
                   linewidth=1.5, label="chosen rewarded higher (share, smoothed)")
        share.set_ylim(-0.02, 1.02)
        share.set_ylabel("share of pairs")
        share.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def centered_mean(values: list[float]) -> list[float]:
    """A moving average centred on each point (about a tenth of the points wide): unlike a running average it
    does not lag behind a falling loss, so the smoothed curve stays on the raw one."""
    half = max(1, len(values) // 20)
    return [sum(window) / len(window) for window in
            (values[max(0, i - half):i + half + 1] for i in range(len(values)))]


def write_preview(examples: list[Example], path: Path, tokenizer) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"row": e.row, "input_ids": e.input_ids, "labels": e.labels,
                                "text": tokenizer.decode(e.input_ids)}, ensure_ascii=False) + "\n")


def write_prompt_preview(prompted: list, path: Path) -> None:
    """--dry-run of a GRPO run: each prompt as text and ids, with the answer its rewards check
    (`prompted`: qlora_kit.data.checkable.Prompted)."""
    with path.open("w", encoding="utf-8") as f:
        for p in prompted:
            f.write(json.dumps({"row": p.row.number, "prompt": p.prompt, "prompt_ids": p.prompt_ids,
                                "answer": p.row.answer, "checked_by": p.row.kind}, ensure_ascii=False) + "\n")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def summarize(records: list[dict], steps: int, train_rows: int, trainable: int, weights: str,
              resume_step: int = 0, quantized: bool = False) -> dict:
    """The run in one dict, over the whole run (a resumed one included: metrics.jsonl holds every step, its clock
    and its token count run on across the resume).

    tokens_per_s counts training time only: wall time minus the periodic and final evaluations (the one before
    training is not in the wall time at all). Eval losses: at the start and at the end, over all completion tokens
    and split into the reasoning's and the answer's. "before" is the 16-bit base, the model the user started from
    (None, with eval_before_note saying why, when it could not be measured); a 4-bit run's NF4 base beside it
    (`*_nf4_base`): what quantization cost, which training wins back first."""
    from qlora_kit.train.base_eval import StartingPoints

    # num_tokens: the running count of tokens trained on (padding excluded), cumulative over the whole run.
    tokens = max((r.get("num_tokens", 0) for r in records), default=0)
    wall = max((r.get("time_s", 0.0) for r in records), default=0.0)
    eval_time = sum(r.get("eval_runtime", 0.0) for r in records if r["step"] > 0)
    train_time = max(wall - eval_time, 0.0)
    train = [r for r in records if "loss" in r]
    before = next((r for r in records if r["step"] == 0 and "eval_loss" in r), {})
    start = StartingPoints.from_records(records, quantized)
    final = next((r for r in reversed(records) if "eval_loss" in r and r["step"] == steps and r["step"] > 0), {})
    mem = snapshot()

    def rounded(record: dict, key: str):
        return round(record[key], 4) if key in record else None

    return {
        "steps": steps,
        "wall_time_s": round(wall, 1),
        "eval_time_s": round(eval_time, 1),
        "train_rows": train_rows,
        "tokens_per_s": round(tokens / train_time, 1) if train_time else 0.0,
        f"peak_{mem.kind.lower()}_gib": round(mem.peak_gib, 3),
        "first_train_loss": round(train[0]["loss"], 4) if train else None,
        "final_train_loss": round(train[-1]["loss"], 4) if train else None,
        "mean_train_loss": mean_train_loss(train),
        "eval_rows": int(before.get("eval_rows") or final.get("eval_rows") or 0) or None,
        **{f"eval{part}_loss_before": rounded(start.sixteen_bit, f"eval{part}_loss") for part in PARTS},
        **({f"eval{part}_loss_nf4_base": rounded(start.nf4, f"eval{part}_loss") for part in PARTS}
           if quantized and before else {}),
        **({"eval_before_note": f"16-bit base {start.not_measured}"} if start.not_measured else {}),
        **{f"final_eval{part}_loss": rounded(final, f"eval{part}_loss") for part in PARTS},
        "trainable_parameters": trainable,
        "model_weights": weights,
        **({"resumed_from_step": resume_step} if resume_step else {}),
    }


PARTS = ("", "_answer", "_reasoning")
"""Eval losses over all completion tokens, the answer's and the reasoning's (eval_loss, eval_answer_loss, ...)."""


def mean_train_loss(train: list[dict]) -> float | None:
    """Mean loss per optimizer step: each logged loss is the mean over the steps since the previous log."""
    if not train:
        return None
    steps = [r["step"] - previous["step"] for previous, r in zip([{"step": 0}, *train], train, strict=False)]
    return round(sum(r["loss"] * n for r, n in zip(train, steps, strict=True)) / max(sum(steps), 1), 4)
