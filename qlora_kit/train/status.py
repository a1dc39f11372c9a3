"""The live view of a training run: a rich panel on a terminal, one plain line per log otherwise.

This is the only module that uses rich's live widgets. It is a `TrainerCallback`, so it sees what
the trainer logs (loss, learning rate, gradient norm, tokens) and adds memory and ETA.
"""

from __future__ import annotations

import dataclasses
import math
import time

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from transformers import TrainerCallback

from qlora_kit.train.base_eval import StartingPoints
from qlora_kit.train.memory_use import snapshot


class StatusCallback(TrainerCallback):
    def __init__(self, title: str, console: Console | None = None, live: bool | None = None,
                 quantized: bool = False, start: StartingPoints | None = None):
        self.title = title
        self.console = console or Console()
        self.use_live = self.console.is_terminal if live is None else live
        self.live: Live | None = None
        self.values: dict[str, float] = {}
        self.smoothed_loss: float | None = None
        self.started = 0.0
        self.total = 0
        self.last_tokens = (0.0, 0, 0.0)  # (time, tokens, eval_seconds) at the previous log, for tokens/s
        self.eval_seconds = 0.0
        """Time spent evaluating since training began: neither tokens/s nor the ETA count it."""
        self.quantized = quantized
        self.start = start or StartingPoints({}, {})
        """Where the eval loss started: the 16-bit base (measured before the run loaded its 4-bit model) and the
        NF4 base (the trainer's eval at step 0); a resumed run reads both from metrics.jsonl."""
        self.reward_parts: dict[str, float] = {}
        """GRPO: reward function name -> its mean over the last logged step's completions."""

    # -- trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.last_tokens = (self.started, 0, 0.0)
        self.total = state.max_steps
        if self.use_live:
            self.live = Live(self.render(state), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        else:
            self.console.print(f"training: {self.title}", highlight=False, soft_wrap=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.live:
            self.live.update(self.render(state))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step > 0 and self.started:
            self.eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.monotonic()
        if state.global_step == 0 and "eval_loss" in logs:  # the eval before training: the "before" of every view
            losses = {k: float(v) for k, v in logs.items() if k.startswith("eval_") and k.endswith("_loss")}
            self.start = dataclasses.replace(self.start, **{"nf4" if self.quantized else "sixteen_bit": losses})
            self.console.print(f"eval loss before training: {starting_text(self.start)}", highlight=False,
                               soft_wrap=True)
            return
        if "loss" in logs and math.isfinite(logs["loss"]):
            loss = float(logs["loss"])
            self.values["loss"] = loss
            # Exponential moving average: the raw per-step loss of small batches is too noisy to read.
            self.smoothed_loss = loss if self.smoothed_loss is None else 0.9 * self.smoothed_loss + 0.1 * loss
        for key in ("learning_rate", "grad_norm", "eval_loss", "eval_answer_loss", *GRPO_KEYS, *PREFERENCE_KEYS):
            if logs.get(key) is not None:
                self.values[key] = float(logs[key])
        # GRPO: each reward function's mean, under its own name ("rewards/format/mean").
        self.reward_parts.update({key.split("/")[1]: float(value) for key, value in logs.items()
                                  if key.startswith("rewards/") and key.endswith("/mean") and value is not None})
        if "num_tokens" in logs:
            then, tokens_then, eval_then = self.last_tokens
            tokens = int(logs["num_tokens"])
            busy = now - then - (self.eval_seconds - eval_then)  # an evaluation between two logs is not training
            if busy > 0 and tokens > tokens_then:
                rate = (tokens - tokens_then) / busy
                previous = self.values.get("tokens_per_s")
                # Smoothed like the loss: an evaluation or a long batch between two logs makes one rate jump.
                self.values["tokens_per_s"] = rate if previous is None else 0.8 * previous + 0.2 * rate
            self.last_tokens = (now, tokens, self.eval_seconds)
        if self.live:
            self.live.update(self.render(state))
        elif "loss" in logs:
            self.console.print(self.plain_line(state), highlight=False, soft_wrap=True)
        elif "eval_loss" in logs:
            self.console.print(f"step {state.global_step}/{self.total} | eval loss {self.eval_now(logs)}",
                               highlight=False, soft_wrap=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close(state)

    def close(self, state=None):
        if self.live:
            if state is not None:
                self.live.update(self.render(state))
            self.live.stop()
            self.live = None

    # -- rendering --------------------------------------------------------------------------------
    def eval_now(self, logs: dict) -> str:
        """The eval loss now, counted from the 16-bit base, with the NF4 base beside it on a 4-bit run."""
        text = eval_text(logs, self.start.sixteen_bit)
        if "eval_loss" in self.start.nf4:
            text += f" · NF4 base {self.start.nf4['eval_loss']:.4f}"
            if not self.start.sixteen_bit:
                text += " (16-bit base not measured)"
        return text

    def eta(self, step: int) -> str:
        if step <= 0 or not self.total:
            return "--"
        training = time.monotonic() - self.started - self.eval_seconds
        remaining = training / step * (self.total - step)
        return _duration(remaining)

    def plain_line(self, state) -> str:
        v, mem = self.values, snapshot()
        parts = [f"step {state.global_step}/{self.total}"]
        if "loss" in v:
            parts.append(f"loss {v['loss']:.4f} (smoothed {self.smoothed_loss:.4f})")
        if "learning_rate" in v:
            parts.append(f"lr {v['learning_rate']:.2e}")
        if "grad_norm" in v:
            parts.append(f"gnorm {v['grad_norm']:.3f}")
        if "reward" in v:
            parts.append(f"reward {reward_text(v, self.reward_parts)}")
            parts.append(completion_text(v))
        if "rewards/margins" in v:
            parts.append(preference_text(v))
        if "tokens_per_s" in v:
            parts.append(f"{v['tokens_per_s']:.0f} tok/s")
        parts.append(f"{mem.kind} {mem.used_gib:.2f} GiB (peak {mem.peak_gib:.2f} of {mem.total_gib:.1f})")
        parts.append(f"eta {self.eta(state.global_step)}")
        return " | ".join(parts)

    def render(self, state):
        v, mem = self.values, snapshot()
        step = state.global_step
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", justify="right")
        grid.add_column(width=30)
        grid.add_column()
        grid.add_row("step", ProgressBar(total=max(self.total, 1), completed=step, width=30),
                     f"{step}/{self.total}  elapsed {_duration(time.monotonic() - self.started)}  "
                     f"eta {self.eta(step)}")
        bar_style = "red" if mem.peak_gib > 0.9 * mem.total_gib else "green"
        grid.add_row(mem.kind, ProgressBar(total=mem.total_gib, completed=mem.used_gib, width=30,
                                           complete_style=bar_style),
                     f"{mem.used_gib:.2f} GiB used, peak {mem.peak_gib:.2f} of {mem.total_gib:.1f} GiB")
        loss = f"{v['loss']:.4f}  (smoothed {self.smoothed_loss:.4f})" if "loss" in v else "--"
        grid.add_row("loss", "", loss)
        if "eval_loss" in v or self.start.sixteen_bit or self.start.nf4:
            now = {k: v[k] for k in ("eval_loss", "eval_answer_loss") if k in v}
            grid.add_row("eval loss", "", self.eval_now(now) if now else
                         f"before training: {starting_text(self.start)}")
        if "reward" in v:  # GRPO: what the run optimises, and the completions it is learning from
            grid.add_row("reward", "", reward_text(v, self.reward_parts))
            grid.add_row("completions", "", completion_text(v))
        if "rewards/margins" in v:  # DPO / KTO / ORPO: how far the chosen side is pulled above the rejected one
            grid.add_row("preference", "", preference_text(v))
        grid.add_row("lr", "", f"{v['learning_rate']:.2e}" if "learning_rate" in v else "--")
        grid.add_row("grad norm", "", f"{v['grad_norm']:.3f}" if "grad_norm" in v else "--")
        grid.add_row("tokens/s", "", f"{v['tokens_per_s']:.0f}" if "tokens_per_s" in v else "--")
        return Panel(grid, title=self.title, title_align="left", expand=False)


GRPO_KEYS = ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio", "kl")
"""What GRPOTrainer logs besides the loss that the view shows (SFT logs none of them)."""


PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""What TRL's DPO / KTO / ORPO trainers log besides the loss that the view shows (their names)."""


def preference_text(values: dict) -> str:
    """"margin +2.41 (chosen +1.90, rejected -0.51), chosen ahead 88%": the implicit rewards of the last step."""
    text = f"margin {values['rewards/margins']:+.3f}"
    if "rewards/chosen" in values and "rewards/rejected" in values:
        text += f" (chosen {values['rewards/chosen']:+.3f}, rejected {values['rewards/rejected']:+.3f})"
    if "rewards/accuracies" in values:
        text += f", chosen ahead {values['rewards/accuracies']:.0%}"
    return text


def reward_text(values: dict, parts: dict[str, float]) -> str:
    """"0.812 ± 0.301 (format 0.95, choice 0.62)": the weighted reward's mean and spread, then each function's mean."""
    text = f"{values['reward']:.3f}"
    if "reward_std" in values:
        text += f" ± {values['reward_std']:.3f}"
    if parts:
        text += " (" + ", ".join(f"{name} {mean:.2f}" for name, mean in parts.items()) + ")"
    return text


def completion_text(values: dict) -> str:
    """"length 212, 5% clipped, kl 0.0021": the completions' mean length, the share cut at the limit, and the KL."""
    parts = []
    if "completions/mean_length" in values:
        parts.append(f"length {values['completions/mean_length']:.0f}")
    if "completions/clipped_ratio" in values:
        parts.append(f"{values['completions/clipped_ratio']:.0%} clipped")
    if "kl" in values:
        parts.append(f"kl {values['kl']:.4f}")
    return ", ".join(parts) or "--"


def starting_text(start: StartingPoints) -> str:
    """"16-bit base 2.6045, NF4 base 2.8947 (4-bit storage +0.2902)": where the eval loss starts, in one line."""
    parts = []
    if "eval_loss" in start.sixteen_bit:
        parts.append(f"16-bit base {eval_text(start.sixteen_bit)}")
    elif start.not_measured:
        parts.append(f"16-bit base {start.not_measured}")
    if "eval_loss" in start.nf4:
        cost = start.quantization_cost()
        parts.append(f"NF4 base {eval_text(start.nf4)}" + (f" (4-bit storage {cost:+.4f})" if cost is not None else ""))
    return ", ".join(parts) or "--"


def eval_text(logs: dict, before: dict | None = None) -> str:
    """"2.9310 → 2.3810 (answer 2.4120 → 1.9770)": the eval loss now, after its value before training when known,
    and the same for the answer tokens alone."""
    before = before or {}

    def change(key: str) -> str:
        now = f"{float(logs[key]):.4f}"
        return f"{before[key]:.4f} → {now}" if key in before else now

    text = change("eval_loss")
    return text + (f" (answer {change('eval_answer_loss')})" if "eval_answer_loss" in logs else "")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
