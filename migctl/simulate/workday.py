"""A realistic workday of CI jobs, generated from a seed (same seed, same trace).

Shape: pushes arrive as a non-homogeneous Poisson process, quiet at night, a morning
ramp from 07:00 to 09:30, a lunch dip around 12:30, an afternoon plateau and an evening
tail. A push starts a workflow: CI (a lint job and a test matrix created together, then
sometimes an integration stage once the matrix is done), a small PR check, or a docs
job. On top: two release bursts (a 30-45 job build matrix within a minute, then a
publish stage) and a nightly scheduled run at 02:00. Durations are log-normal per job
kind. The bundled `workday` trace is `generate(seed=1, jobs=3000)`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from migctl.simulate.trace import Trace, TraceJob

FULL = ("self-hosted", "linux", "x64")

# Pushes per hour, relative: (hour of day, weight), linear in between.
PROFILE = (
    (0.0, 0.3),
    (6.0, 0.3),
    (7.0, 1.5),
    (8.0, 6.0),
    (9.5, 10.0),
    (11.75, 10.0),
    (12.25, 4.0),
    (13.25, 4.0),
    (14.0, 10.0),
    (16.5, 10.0),
    (17.5, 6.0),
    (18.5, 3.0),
    (20.0, 1.2),
    (22.0, 0.5),
    (24.0, 0.3),
)


def intensity(hour: float) -> float:
    for (h0, w0), (h1, w1) in itertools.pairwise(PROFILE):
        if h0 <= hour <= h1:
            return w0 + (w1 - w0) * (hour - h0) / (h1 - h0)
    return PROFILE[-1][1]


@dataclass
class _Gen:
    rng: random.Random

    def duration(self, median: float, sigma: float) -> float:
        value = self.rng.lognormvariate(0.0, sigma) * median
        return float(round(min(max(value, 15.0), 5400.0)))

    def labels(self) -> tuple[str, ...]:
        roll = self.rng.random()
        if roll < 0.85:
            return FULL
        return FULL[:2] if roll < 0.95 else FULL[:1]

    def push_time(self) -> float:
        peak = max(w for _, w in PROFILE)
        while True:
            t = self.rng.uniform(0.0, 86400.0)
            if self.rng.random() * peak < intensity(t / 3600.0):
                return t

    def jitter(self, t: float, spread: float = 3.0) -> float:
        return t + self.rng.uniform(0.0, spread)

    def push(self, t: float) -> list[tuple[float, tuple[str, ...], float]]:
        labels = self.labels()
        roll = self.rng.random()
        if roll < 0.55:  # CI: lint + test matrix, maybe an integration stage after it
            jobs = [(self.jitter(t), labels, self.duration(90, 0.4))]
            jobs += [
                (self.jitter(t), labels, self.duration(360, 0.45))
                for _ in range(self.rng.randint(2, 6))
            ]
            if self.rng.random() < 0.4:
                after = t + max(d for _, _, d in jobs) + self.rng.uniform(5, 40)
                jobs += [
                    (self.jitter(after), labels, self.duration(720, 0.35))
                    for _ in range(self.rng.randint(1, 2))
                ]
            return jobs
        if roll < 0.85:  # a small PR check
            return [
                (self.jitter(t), labels, self.duration(180, 0.5))
                for _ in range(self.rng.randint(1, 2))
            ]
        return [(self.jitter(t), labels, self.duration(45, 0.5))]  # docs, bots

    def burst(
        self, t: float, count: int, median: float, spread: float
    ) -> list[tuple[float, tuple[str, ...], float]]:
        return [(self.jitter(t, spread), FULL, self.duration(median, 0.4)) for _ in range(count)]


def generate(seed: int = 1, jobs: int = 3000) -> Trace:
    """A day (00:00 to 24:00) of exactly `jobs` jobs."""
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    gen = _Gen(random.Random(seed))
    fixed = gen.burst(2 * 3600.0, gen.rng.randint(15, 25), 900, 120)  # nightly schedule
    for window in ((10.5, 11.5), (15.5, 16.75)):  # release bursts
        t = gen.rng.uniform(*window) * 3600.0
        fixed += gen.burst(t, gen.rng.randint(30, 45), 600, 60)
        fixed += gen.burst(t + 900 + gen.rng.uniform(0, 300), 10, 180, 30)
    fixed = fixed[: max(0, jobs // 4)]
    rows = list(fixed)
    while len(rows) < jobs:
        rows += [row for row in gen.push(gen.push_time()) if row[0] < 86400.0]
    rows = rows[:jobs]
    trace_jobs = tuple(
        TraceJob(round(arrival, 1), labels, duration) for arrival, labels, duration in rows
    )
    meta = {
        "generator": f"migctl simulate workday seed={seed} jobs={jobs}",
        "origin": "00:00 of a workday",
        "horizon_s": "86400",
    }
    return Trace(trace_jobs, "workday", 86400.0, meta)
