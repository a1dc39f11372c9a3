"""Stopping cleanly: Ctrl-C / SIGTERM finish the current optimizer step and save a checkpoint; a
second Ctrl-C quits at once. Also the fault-injection switch the tests use to raise a real
out-of-memory error at a chosen step."""

from __future__ import annotations

import os
import signal

import torch
from transformers import TrainerCallback

from qlora_kit.distributed import on_any_rank

FAULT_OOM_ENV = "QLORA_KIT_FAULT_OOM_AT_STEP"


class GracefulStop(TrainerCallback):
    def __init__(self, on_request=print):
        self.signal_name = ""  # set by the first Ctrl-C / SIGTERM this process receives
        self.on_request = on_request
        self._previous = {}

    def install(self) -> None:
        # SIGBREAK: Ctrl-Break in a Windows console (Windows has no SIGTERM sender; a killed process just ends).
        for sig in (signal.SIGINT, signal.SIGTERM, *filter(None, [getattr(signal, "SIGBREAK", None)])):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signal_name:  # second request: the user means it
            self.uninstall()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.on_request(f"{self.signal_name}: finishing this step and saving a checkpoint "
                        "(press Ctrl-C again to quit at once, without saving)")

    def on_step_end(self, args, state, control, **kwargs):
        if on_any_rank(bool(self.signal_name)):
            self.signal_name = self.signal_name or "SIGINT"  # another rank was told (torchrun forwards to all)
            control.should_save = True
            control.should_training_stop = True


class InjectOutOfMemory(TrainerCallback):
    """Raises torch.OutOfMemoryError when step N begins (N from $QLORA_KIT_FAULT_OOM_AT_STEP): the OOM
    handling is tested with the real exception, at a known step, on any machine."""

    def __init__(self, step: int):
        self.step = step

    @classmethod
    def from_environment(cls) -> InjectOutOfMemory | None:
        value = os.environ.get(FAULT_OOM_ENV, "")
        return cls(int(value)) if value.isdigit() else None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OOM_ENV}={self.step}).")
