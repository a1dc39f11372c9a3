"""The longest-sequence search: pure, `fits(length)` runs or recalls a trial."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SearchResult:
    longest: int
    """Longest length seen to fit (0: none fit)."""
    status: str
    """`found` (longest + resolution ran out of memory), `at_upper_bound`, `none_fit`, or `incomplete`."""
    probes: list[int] = field(default_factory=list)


def search_longest(fits, guess: int, step: int, upper: int, lo: int = 0, hi: int | None = None) -> SearchResult:
    """Exponential search from the planner's guess, then bisection, over multiples of `step` up to `upper`.

    `lo` / `hi`: lengths already known to fit / to run out of memory (from the fixed-length trials).
    `fits(n)` returns True, False, or None when it could not tell (error, time budget): the search stops there.
    """
    def down(n):
        return n // step * step

    probes: list[int] = []
    probe = min(max(down(guess), lo + step), upper if hi is None else hi - step)
    growth = 0.15
    while (hi is None and lo < upper) or (hi is not None and hi - lo > step):
        ok = fits(probe)
        if ok is None:
            return SearchResult(lo, "incomplete", probes)
        probes.append(probe)
        if ok:
            lo = probe
        else:
            hi = probe
        if hi is None:  # nothing has run out of memory yet: grow, faster each time
            probe = min(upper, max(lo + step, -(-int(lo * (1 + growth)) // step) * step))
            growth *= 2
        elif lo == 0:  # nothing has fitted yet: shrink, faster each time
            probe = max(step, down(int(hi / (1 + growth))))
            growth *= 2
        else:
            probe = lo + (hi - lo) // step // 2 * step
    if lo == 0:
        return SearchResult(0, "none_fit", probes)
    return SearchResult(lo, "at_upper_bound" if hi is None else "found", probes)
