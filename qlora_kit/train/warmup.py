"""The warmup's first step trains: transformers' warmup schedules start at a learning rate of exactly 0, so the first
optimizer step of every run changed no weight (its log said "lr 0.00e+00"): one step of a short run wasted.

Shifted by one step during the warmup only: the ramp goes lr/W, 2 lr/W, ..., lr over its W steps (where it went 0,
lr/W, ..., (W-1) lr/W), and from step W on the schedule is exactly transformers' own. The scheduler's state (its step
count) is the library's, so a resumed run continues the same schedule.
"""

from __future__ import annotations


class WarmupFromTheFirstStep:
    """Mixed into our trainers (before the TRL class) so that SFT and GRPO build their schedule the same way."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        start_warmup_above_zero(scheduler, self.args.get_warmup_steps(num_training_steps))
        return scheduler


def start_warmup_above_zero(scheduler, warmup_steps: int) -> None:
    """Wrap a LambdaLR scheduler's factors in place; other schedulers (ReduceLROnPlateau) and no warmup: unchanged."""
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps <= 0 or not isinstance(scheduler, LambdaLR):
        return
    scheduler.lr_lambdas = [shifted_warmup(factor, warmup_steps) for factor in scheduler.lr_lambdas]
    # LambdaLR set the optimizer's rate from the old factor when it was built: set it from the new one.
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def shifted_warmup(factor, warmup_steps: int):
    """The warmup one step ahead, the rest unchanged. A plain function on purpose: LambdaLR saves the state of
    callable objects into the checkpoint (and loads it back with torch.load), but never a function's; a resumed
    run builds this again from the recipe."""

    def factor_from_the_first_step(step: int) -> float:
        return factor(step + 1 if step < warmup_steps else step)

    return factor_from_the_first_step
