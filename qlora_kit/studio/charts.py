"""The Train screen's live charts (four; loss, rewards, accuracy, memory and learning rate for a preference run),
drawn here as one small SVG picture each and sent as HTML.

Why not Gradio's LinePlot: each of its updates re-runs Vega's parser and a canvas render, in software in a headless
browser, on the cores a CPU run trains on. Measured with `python -m qlora_kit.studio.measure` (3 rounds of the demo,
docs/studio.md), chromium spent a median 5.15 CPU-seconds per run with the four LinePlots and 4.72 with these
pictures, of which about 1.4 is the idle browser's own; the wall-time difference was within the rounds' noise. What
decided it: the picture is a few kilobytes the server makes without pandas, a test can read what it draws
(`data-points`, `data-last-step`), and each series names its last value, which a hover tooltip would only show on
demand.
"""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT = 460, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 42, 26
"""The plot area's margins inside the picture: room for the y labels, the legend above and the x labels below."""
MAX_POINTS = 400
"""Points drawn per series at most (a long run keeps every k-th point, and always its last): the picture stays small."""
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")

CSS = """
.charts { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 10px; }
@media (max-width: 800px) { .charts { grid-template-columns: 1fr; } }
.chart { border: 1px solid var(--border-color-primary, #ddd); border-radius: 6px; padding: 4px 6px; }
.chart svg { width: 100%; height: auto; display: block; }
.chart svg text { font: 11px sans-serif; fill: var(--body-text-color, #333); }
.chart .chart-title { font-weight: 600; font-size: 12px; }
.chart .grid { stroke: #8884; stroke-width: 1; }
.chart .empty { fill: #888; }
"""


def nice_step(span: float, ticks: int = 4) -> float:
    """A round tick distance (1, 2 or 5 times a power of ten) giving about `ticks` ticks over `span`."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def label(value: float) -> str:
    """A tick or a last value, short: 0.00012 as 1.2e-04, 1234.5 as 1234, 0.4567 as 0.457."""
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    every = math.ceil(len(points) / MAX_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], colours: dict[str, str] | None = None,
               elem_id: str = "", words: dict[str, str] | None = None) -> str:
    """One chart: `series` maps a name to its (step, value) points, in step order. Names with no point are left
    out; a chart with no point at all says so rather than drawing empty axes."""
    colours = colours or {}
    words = {"empty": "no points yet", "step": "step", **(words or {})}
    series = {name: thin([(x, y) for x, y in points if math.isfinite(y)]) for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f"<text class='chart-title' x='4' y='13'>{html.escape(title)}</text>"]
    points_drawn = sum(len(p) for p in series.values())
    if not series:
        parts.append(f"<text class='empty' x='{LEFT + width / 2}' y='{TOP + height / 2}' text-anchor='middle'>"
                     f"{html.escape(words['empty'])}</text>")
        return _figure(parts, elem_id, 0, None)
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.06 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * width

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * height

    step = nice_step(y1 - y0)
    tick = math.ceil(y0 / step) * step
    while tick <= y1:
        parts.append(f"<line class='grid' x1='{LEFT}' x2='{LEFT + width}' y1='{py(tick):.1f}' y2='{py(tick):.1f}'/>"
                     f"<text x='{LEFT - 4}' y='{py(tick) + 4:.1f}' text-anchor='end'>{label(tick)}</text>")
        tick += step
    step = max(1.0, nice_step(x1 - x0, 5))
    tick = math.ceil(x0 / step) * step
    while tick <= x1:
        parts.append(f"<text x='{px(tick):.1f}' y='{HEIGHT - 8}' text-anchor='middle'>{label(tick)}</text>")
        tick += step
    parts.append(f"<text class='empty' x='4' y='{HEIGHT - 8}'>{html.escape(words['step'])}</text>")
    legend_x = LEFT
    for i, (name, points) in enumerate(series.items()):
        colour = colours.get(name, PALETTE[i % len(PALETTE)])
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        tip = f"{name}: {label(points[-1][1])} at step {label(points[-1][0])}"
        if len(points) == 1:
            parts.append(f"<circle cx='{px(points[0][0]):.1f}' cy='{py(points[0][1]):.1f}' r='3' "
                         f"fill='{colour}' data-series='{html.escape(name)}' data-points='1'>"
                         f"<title>{html.escape(tip)}</title></circle>")
        else:
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.6' points='{coords}' "
                         f"data-series='{html.escape(name)}' data-points='{len(points)}'>"
                         f"<title>{html.escape(tip)}</title></polyline>")
        text = f"{name} {label(points[-1][1])}"
        parts.append(f"<rect x='{legend_x}' y='{TOP - 17}' width='10' height='3' fill='{colour}'/>"
                     f"<text x='{legend_x + 13}' y='{TOP - 13}'>{html.escape(text)}</text>")
        legend_x += 20 + 6.2 * len(text)
    return _figure(parts, elem_id, points_drawn, max(xs))


def _figure(parts: list[str], elem_id: str, points: int, last_step: float | None) -> str:
    # data-points and data-last-step say what is drawn, for the browser test and the latency measurement.
    ident = f" id='{elem_id}'" if elem_id else ""
    last = f" data-last-step='{last_step:g}'" if last_step is not None else ""
    return (f"<div class='chart'{ident} data-points='{points}'{last}><svg viewBox='0 0 {WIDTH} {HEIGHT}' role='img' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg></div>")


LOSS_COLOURS = {"train": "#1f77b4", "eval": "#ff7f0e"}
REWARD_COLOURS = {"chosen": "#2ca02c", "rejected": "#d62728", "margin": "#1f77b4"}
MEMORY_COLOURS = {"vram used": "#2ca02c", "vram peak": "#d62728", "ram used": "#2ca02c", "ram peak": "#d62728"}


def run_charts(records: list[dict], titles: dict[str, str]) -> str:
    """metrics.jsonl's records as the four charts: loss (train, eval), memory (used, peak), tokens/s, learning
    rate, and for a preference run two more: rewards (chosen, rejected, margin) and preference accuracy. `titles`
    names them in the page's language (keys loss, memory, speed, lr, rewards, accuracy; and empty, step for the
    words inside a chart)."""

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None and "step" in r]

    memory_keys = sorted({k for r in records for k in r if k.endswith(("_used_gib", "_peak_gib"))})
    words = {key: titles[key] for key in ("empty", "step") if key in titles}
    loss = line_chart(titles["loss"], {"train": points("loss"), "eval": points("eval_loss")}, LOSS_COLOURS,
                      "loss-chart", words)
    memory = line_chart(titles["memory"], {k.removesuffix("_gib").replace("_", " "): points(k) for k in memory_keys},
                        MEMORY_COLOURS, "memory-chart", words)
    speed = line_chart(titles["speed"], {"tokens/s": points("tokens_per_s")}, elem_id="speed-chart", words=words)
    lr = line_chart(titles["lr"], {"learning rate": points("learning_rate")}, elem_id="lr-chart", words=words)
    charts = [loss, memory, speed, lr]
    if any("rewards/chosen" in r for r in records):
        # DPO / KTO / ORPO: TRL's implicit rewards against the reference and the share of pairs rewarded the right
        # way, the two figures that say a preference run is learning (its loss alone falls for the wrong reasons
        # too: both sides' log-probabilities can drop together). Beside the loss, in the first row of the screen;
        # TRL's preference trainers log no token counts, so their speed chart would only ever say "no points".
        rewards = line_chart(titles.get("rewards", "rewards"), {"chosen": points("rewards/chosen"),
                                                                "rejected": points("rewards/rejected"),
                                                                "margin": points("rewards/margins")},
                             REWARD_COLOURS, "rewards-chart", words)
        accuracy = line_chart(titles.get("accuracy", "accuracy"), {"chosen ahead": points("rewards/accuracies")},
                              {"chosen ahead": "#2ca02c"}, "accuracy-chart", words)
        charts = [loss, rewards, accuracy, memory, lr] + ([speed] if points("tokens_per_s") else [])
    return f"<div class='charts'>{''.join(charts)}</div>"
