"""The warmup's first step trains: transformers' own schedule, shifted one step during the warmup only."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import get_scheduler

from qlora_kit.train.warmup import start_warmup_above_zero


def rates(name: str, warmup: int, steps: int, shifted: bool) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    if shifted:
        start_warmup_above_zero(scheduler, warmup)
    out = []
    for _ in range(steps):  # the rate each optimizer step uses, as the trainer logs it (before scheduler.step)
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_the_first_step_has_a_learning_rate_and_the_rest_is_transformers_schedule(name):
    library, ours = rates(name, 4, 20, shifted=False), rates(name, 4, 20, shifted=True)
    assert library[0] == 0.0  # what every run's first step did before
    assert ours[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # lr/W, 2 lr/W, ... lr over the W warmup steps
    assert ours[4:] == pytest.approx(library[4:])  # from the end of the warmup on: unchanged


def test_no_warmup_is_left_alone():
    assert rates("linear", 0, 10, shifted=True) == pytest.approx(rates("linear", 0, 10, shifted=False))


def test_a_resumed_schedule_continues_where_it_stopped():
    """The trainer saves scheduler.state_dict() and loads it back with torch.load (weights only): the shifted
    factor must not be in it, and the rebuilt scheduler continues the same rates."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=4, num_training_steps=20)
    start_warmup_above_zero(scheduler, 4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved = io.BytesIO()
    torch.save(scheduler.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)

    resumed_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    resumed = get_scheduler("linear", resumed_optimizer, num_warmup_steps=4, num_training_steps=20)
    start_warmup_above_zero(resumed, 4)
    resumed.load_state_dict(state)
    assert scheduler.get_last_lr() == pytest.approx([1e-3])  # step 3: the last warmup step, at the full rate
    for _ in range(3):
        scheduler.step()
        resumed.step()
        assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
