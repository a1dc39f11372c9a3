"""Accuracy with its uncertainty: the Wilson score interval, which stays inside [0, 1] and is honest for the few
dozen questions a CPU can score (the normal approximation lm_eval's stderr uses is not, near 0 or 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    def describe(self) -> str:
        """`62.5 % (49.1–74.2), 25/40`"""
        low, high = self.ci95
        return f"{100 * self.value:.1f} % ({100 * low:.1f}–{100 * high:.1f}), {self.correct}/{self.n}"

    def as_dict(self) -> dict:
        low, high = self.ci95
        return {"correct": self.correct, "n": self.n, "accuracy": round(self.value, 4),
                "ci95": [round(low, 4), round(high, 4)]}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion correct/n ((0, 1) for n = 0: nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
