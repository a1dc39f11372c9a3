"""What a run leaves behind in its output directory, and the guard that keeps finished runs safe.

    adapter/          PEFT adapter (PeftModel.from_pretrained) + the tokenizer
    recipe.toml       the resolved recipe: merge and resume need nothing else
    metrics.jsonl     one JSON object per logged step
    loss_curve.png    train (raw + smoothed) and eval loss
    summary.json      steps, wall time, tokens/s, peak memory, final losses
    preview.jsonl     (--dry-run) input_ids and labels of the first examples
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from qlora_kit.encode import Example
from qlora_kit.errors import UserError
from qlora_kit.memory import snapshot

ADAPTER_DIR, RECIPE_FILE, METRICS_FILE = "adapter", "recipe.toml", "metrics.jsonl"
CURVE_FILE, SUMMARY_FILE, PREVIEW_FILE = "loss_curve.png", "summary.json", "preview.jsonl"


def prepare_output_dir(directory: Path, overwrite: bool) -> None:
    """Refuse to write over a finished run unless told to; create the directory otherwise."""
    finished = [name for name in (ADAPTER_DIR, SUMMARY_FILE) if (directory / name).exists()]
    if finished and not overwrite:
        raise UserError(f"{directory} already holds a finished run ({', '.join(finished)}).",
                        hint="Choose another output.dir (e.g. output.dir=runs/medical-2), or pass --overwrite "
                             "to replace it.")
    directory.mkdir(parents=True, exist_ok=True)


class MetricsRecorder(TrainerCallback):
    """Appends every log (train and eval) to metrics.jsonl, with time and memory, as it happens:
    a run that dies still leaves its curve behind."""

    def __init__(self, path: Path):
        self.path = path
        self.started = time.monotonic()
        self.records: list[dict] = []
        path.write_text("", encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        mem = snapshot()
        record = {"step": state.global_step, "time_s": round(time.monotonic() - self.started, 3),
                  **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))},
                  f"{mem.kind.lower()}_used_gib": round(mem.used_gib, 4),
                  f"{mem.kind.lower()}_peak_gib": round(mem.peak_gib, 4)}
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


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
        smoothed, value = [], losses[0]
        for loss in losses:
            value = 0.9 * value + 0.1 * loss
            smoothed.append(value)
        ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_preview(examples: list[Example], path: Path, tokenizer) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"row": e.row, "input_ids": e.input_ids, "labels": e.labels,
                                "text": tokenizer.decode(e.input_ids)}, ensure_ascii=False) + "\n")


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
