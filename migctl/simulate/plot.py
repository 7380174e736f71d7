"""The plot: one self-contained HTML file of inline SVG (no script, no dependency).

At the top, the p95 queue wait of every policy over the day, with the oracle's; then per
policy, its queue wait (p95 and max per bucket) and its pool over time (running, busy,
stopped/suspended VMs, jobs waiting, the warm pool target).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

from migctl.simulate.engine import Run
from migctl.simulate.oracle import Oracle
from migctl.simulate.report import percentile, table

W, H = 980, 190  # one chart
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 14, 26
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
WAIT_TICKS = (0, 1, 3, 10, 30, 100, 300, 1000, 3000)


def _bucket_size(horizon: float) -> float:
    return 900.0 if horizon <= 2 * 86400 else 3600.0


def wait_buckets(
    waits: Sequence[tuple[float, float]], horizon: float, pct: float
) -> list[tuple[float, float]]:
    """(bucket middle, pct-th wait of the jobs that arrived in it), empty buckets left out."""
    size = _bucket_size(horizon)
    buckets: dict[int, list[float]] = {}
    for arrival, wait in waits:
        buckets.setdefault(int(arrival // size), []).append(wait)
    return [
        ((k + 0.5) * size, percentile(sorted(v), pct) if pct < 100 else max(v))
        for k, v in sorted(buckets.items())
    ]


class _Chart:
    def __init__(self, horizon: float, ymax: float, scale: Callable[[float], float]) -> None:
        self.horizon = max(horizon, 1.0)
        self.scale = scale
        self.ytop = scale(ymax) or 1.0
        self.parts: list[str] = []

    def x(self, t: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * t / self.horizon

    def y(self, v: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - self.scale(v) / self.ytop)

    def axes(self, ticks: Sequence[float], unit: str) -> None:
        p = self.parts
        p.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" '
            f'height="{H - TOP - BOTTOM}" fill="#fafafa" stroke="#ccc"/>'
        )
        for v in ticks:
            y = self.y(v)
            if TOP - 0.5 <= y <= H - BOTTOM + 0.5:
                p.append(
                    f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                    'stroke="#e4e4e4"/>'
                )
                p.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        p.append(
            f'<text x="12" y="{TOP + (H - TOP - BOTTOM) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {TOP + (H - TOP - BOTTOM) / 2:.0f})">{unit}</text>'
        )
        step = 3600.0 * max(1, math.ceil(self.horizon / 3600.0 / 24))
        t = 0.0
        while t <= self.horizon + 1:
            x = self.x(t)
            p.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="#eee"/>'
            )
            label = f"{int(t // 3600) % 24:02d}:00" if step == 3600 else f"{t / 3600:g}h"
            if int(t // step) % 2 == 0:
                p.append(f'<text x="{x:.1f}" y="{H - 8}" text-anchor="middle">{label}</text>')
            t += step

    def line(self, points: Sequence[tuple[float, float]], color: str, **attrs: str) -> None:
        if not points:
            return
        coords = " ".join(f"{self.x(t):.1f},{self.y(v):.1f}" for t, v in points)
        style = {"stroke-width": "1.5"} | {k.replace("_", "-"): v for k, v in attrs.items()}
        extra = " ".join(f'{k}="{v}"' for k, v in style.items())
        self.parts.append(f'<polyline fill="none" stroke="{color}" {extra} points="{coords}"/>')

    def area(self, points: Sequence[tuple[float, float]], color: str) -> None:
        if not points:
            return
        base = self.y(0)
        coords = " ".join(f"{self.x(t):.1f},{self.y(v):.1f}" for t, v in points)
        first, last = self.x(points[0][0]), self.x(points[-1][0])
        self.parts.append(
            f'<polygon fill="{color}" fill-opacity="0.25" stroke="none" '
            f'points="{first:.1f},{base:.1f} {coords} {last:.1f},{base:.1f}"/>'
        )

    def svg(self, title: str, legend: Sequence[tuple[str, str, bool]]) -> str:
        keys = []
        x = LEFT
        for name, color, dashed in legend:
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            keys.append(
                f'<line x1="{x}" x2="{x + 18}" y1="6" y2="6" stroke="{color}" '
                f'stroke-width="2"{dash}/><text x="{x + 22}" y="10">{html.escape(name)}</text>'
            )
            x += 30 + 7 * len(name)
        return (
            f"<figure><figcaption>{html.escape(title)}</figcaption>"
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 12}" '
            f'viewBox="0 -12 {W} {H + 12}" font-family="sans-serif" font-size="11">'
            + "".join(keys)
            + "".join(self.parts)
            + "</svg></figure>"
        )


def _wait_scale(v: float) -> float:
    return math.log10(1.0 + max(v, 0.0))


def _steps(points: Sequence[tuple[float, float]], end: float) -> list[tuple[float, float]]:
    """Step-shaped polyline through (time, value) samples."""
    out: list[tuple[float, float]] = []
    for i, (t, v) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        out += [(t, v), (nxt, v)]
    return out


def pool_series(run: Run, end: float, size: float = 120.0) -> dict[str, list[tuple[float, float]]]:
    """Per `size` seconds: the most VMs running/busy and jobs waiting, and the VMs down
    at the bucket's end."""
    cols = {"running": 1, "busy": 2, "down": 3, "waiting": 5}
    buckets: dict[int, dict[str, float]] = {}
    last = {name: 0.0 for name in cols}
    timeline = run.timeline
    i = 0
    for k in range(math.ceil(end / size)):
        stop = (k + 1) * size
        peak = dict(last)
        while i < len(timeline) and timeline[i][0] < stop:
            row = timeline[i]
            values = {
                "running": float(row[1]),
                "busy": float(row[2]),
                "down": float(row[3] + row[4]),
                "waiting": float(row[5]),
            }
            for name in ("running", "busy", "waiting"):
                peak[name] = max(peak[name], values[name])
            peak["down"] = values["down"]
            last = values
            i += 1
        buckets[k] = peak
    return {name: [(k * size, buckets[k][name]) for k in sorted(buckets)] for name in cols}


def render(report: dict[str, Any], runs: Sequence[Run], bound: Oracle, horizon: float) -> str:
    end = max([horizon, *(run.end for run in runs)])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>migctl simulate: {html.escape(report['trace']['name'])}</title>",
        "<style>body{font-family:sans-serif;margin:20px;color:#222}"
        "pre{background:#f6f6f6;padding:10px;font-size:12px}"
        "figure{margin:6px 0 14px}figcaption{font-weight:bold;font-size:13px}"
        "h2{margin-top:28px;font-size:16px}</style></head><body>",
        f"<h1>migctl simulate — {html.escape(report['trace']['name'])}: "
        f"{report['trace']['jobs']} jobs</h1>",
        f"<pre>{html.escape(table(report))}</pre>",
    ]
    oracle_p95 = wait_buckets(bound.waits, end, 95)
    all_waits = [w for run in runs for _, w in run.waits] + [w for _, w in bound.waits]
    top = max([10.0, *all_waits])
    ticks = [v for v in WAIT_TICKS if v <= top * 1.01] + [
        next((v for v in WAIT_TICKS if v > top * 1.01), top)
    ]
    ymax = ticks[-1]
    overview = _Chart(end, ymax, _wait_scale)
    overview.axes(ticks, "wait s")
    legend = []
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        overview.line(wait_buckets(run.waits, end, 95), color)
        legend.append((run.policy.name, color, False))
    overview.line(oracle_p95, "#777", stroke_dasharray="5 3")
    legend.append(("oracle", "#777", True))
    size_min = _bucket_size(end) / 60
    parts.append(
        overview.svg(f"p95 queue wait per {size_min:g} min of arrivals (log scale)", legend)
    )
    vm_top = max(
        [5.0]
        + [float(max(row[1], row[3] + row[4], row[5])) for run in runs for row in run.timeline]
    )
    vm_ticks = _nice_ticks(vm_top)
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        parts.append(
            f"<h2>{html.escape(run.policy.name)}: {html.escape(run.policy.describe())}</h2>"
        )
        chart = _Chart(end, ymax, _wait_scale)
        chart.axes(ticks, "wait s")
        chart.line(wait_buckets(run.waits, end, 100), "#bbb")
        chart.line(wait_buckets(run.waits, end, 95), color)
        chart.line(oracle_p95, "#777", stroke_dasharray="5 3")
        parts.append(
            chart.svg(
                "queue wait (arrival to job start)",
                [("p95", color, False), ("max", "#bbb", False), ("oracle p95", "#777", True)],
            )
        )
        series = pool_series(run, end)
        pool = _Chart(end, vm_ticks[-1], float)
        pool.axes(vm_ticks, "VMs / jobs")
        pool.area(_steps(series["running"], end), color)
        pool.line(_steps(series["running"], end), color)
        pool.line(_steps(series["busy"], end), "#333", stroke_width="1")
        pool.line(_steps(series["down"], end), "#ff7f0e")
        pool.line(_steps(series["waiting"], end), "#d62728", stroke_width="1")
        warm = _warm_series(run, end)
        pool.line(warm, "#2ca02c", stroke_dasharray="4 3")
        parts.append(
            pool.svg(
                "pool over time (per 2 min: most running/busy/waiting; stopped+suspended at end)",
                [
                    ("running VMs", color, False),
                    ("busy", "#333", False),
                    ("stopped+suspended", "#ff7f0e", False),
                    ("jobs waiting", "#d62728", False),
                    ("warm target", "#2ca02c", True),
                ],
            )
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _warm_series(run: Run, end: float) -> list[tuple[float, float]]:
    points = []
    t = 0.0
    while t < end:
        points.append((t, float(run.policy.min_ready(t))))
        t = min(run.policy.next_warm_change(t), end)
    return _steps(points, end)


def _nice_ticks(top: float) -> list[float]:
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000) if top / s <= 8)
    return [float(step * k) for k in range(math.ceil(top / step) + 1)]
