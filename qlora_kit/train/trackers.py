"""Experiment trackers (output.report_to): checked before any weight loads, TensorBoard kept in the run directory.

The logging itself is transformers' own integrations; qlora_kit only makes sure the package is there before a long
load and that the TensorBoard event files land where the user looks for them.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import Recipe

TENSORBOARD_DIR = "tensorboard"
"""output.report_to = ["tensorboard"] writes its event files here, in the run directory: `tensorboard --logdir`."""


def log_tensorboard_into(trainer, directory: Path) -> None:
    """transformers' TensorBoard callback defaults to a folder under the checkpoints, which a finished run deletes;
    the run directory keeps it (TENSORBOARD_LOGGING_DIR, when set, still wins)."""
    import os

    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            callback.logging_dir = str(directory)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(recipe: Recipe) -> None:
    """Before any weights load: a tracker in output.report_to whose package is missing would fail in the trainer."""
    import importlib.util

    missing = [name for name in recipe.output.report_to if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise UserError(f"output.report_to asks for {', '.join(missing)}, which is not installed.",
                        hint=f'Install it: pip install "qlora_kit[{",".join(missing)}]" (or remove it from '
                             "output.report_to).")
