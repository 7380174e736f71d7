"""What a simulated pool is run with: the pool policy (warm pool, idle path, limits) and
the VM timings of the simulated cloud, each parsed from a short `key=value` text.

Policy fields are the controller's own settings (vm_manager.*, pool.idle_action,
scheduler.max_concurrent_assignments); `warm` adds a time-of-day warm pool, a variant
the controller does not have yet, to see what one would buy.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from migctl.domain.scheduler import Limits

DAY = 86400.0
IdleAction = Literal["stop", "suspend", "delete"]
IDLE_ACTIONS: tuple[IdleAction, ...] = ("stop", "suspend", "delete")


class SpecError(ValueError):
    """A policy, timings or window text that cannot be read; the message says the fix."""


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str, what: str) -> float:
    """Seconds from `600`, `600s`, `10m`, `1h30m`, `1.5h`."""
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or match is None:
        raise SpecError(f"{what}: expected a duration like 600, 90s, 10m or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _parse_int(text: str, what: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"{what}: expected a whole number, got {text!r}") from None
    if value < low:
        raise SpecError(f"{what}: expected at least {low}, got {value}")
    return value


def _clock(text: str, what: str) -> float:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if match is None or int(match[1]) * 60 + int(match[2]) > 24 * 60 or int(match[2]) > 59:
        raise SpecError(f"{what}: expected a time of day HH:MM, got {text!r}")
    return int(match[1]) * 3600.0 + int(match[2]) * 60.0


@dataclass(frozen=True)
class WarmWindow:
    """Between `start` and `end` (seconds after midnight, trace time) keep `min_ready`."""

    start: float
    end: float
    min_ready: int

    def covers(self, time_of_day: float) -> bool:
        if self.start <= self.end:
            return self.start <= time_of_day < self.end
        return time_of_day >= self.start or time_of_day < self.end  # wraps past midnight

    def text(self) -> str:
        def hm(s: float) -> str:
            return f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d}"

        return f"{hm(self.start)}-{hm(self.end)}@{self.min_ready}"


def parse_windows(text: str) -> tuple[WarmWindow, ...]:
    """`07:30-18:00@8` or several joined by `+`: `07:00-09:00@4+09:00-18:00@10`."""
    out = []
    for part in text.split("+"):
        match = re.fullmatch(r"\s*([\d:]+)\s*-\s*([\d:]+)\s*@\s*(\d+)\s*", part)
        if match is None:
            raise SpecError(
                f"warm: expected HH:MM-HH:MM@N (several joined by '+'), got {part.strip()!r}"
            )
        start, end = _clock(match[1], "warm"), _clock(match[2], "warm")
        if start == end:
            raise SpecError(f"warm: window {part.strip()!r} is empty")
        out.append(WarmWindow(start % DAY, end if end == DAY else end % DAY, int(match[3])))
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    """One way of running the pool. Defaults are the seed controller's (see `PRESETS`)."""

    name: str = "seed"
    min_ready_vms: int = 2
    idle_timeout: float = 600.0
    idle_action: IdleAction = "stop"
    max_vms: int = 50
    max_scale_up_per_minute: int = 5
    max_concurrent_assignments: int = 10
    warm: tuple[WarmWindow, ...] = ()

    def min_ready(self, now: float) -> int:
        """The warm pool size at `now`: the first window covering the time of day, else
        `min_ready_vms`."""
        time_of_day = now % DAY
        for window in self.warm:
            if window.covers(time_of_day):
                return window.min_ready
        return self.min_ready_vms

    def next_warm_change(self, now: float) -> float:
        """The first window boundary after `now` (inf when there are no windows)."""
        if not self.warm:
            return float("inf")
        day = now - now % DAY
        edges = sorted({e for w in self.warm for e in (w.start, w.end)})
        for base in (day, day + DAY):
            for edge in edges:
                if base + edge > now:
                    return base + edge
        return float("inf")  # pragma: no cover - edges are within a day

    @property
    def limits(self) -> Limits:
        return Limits(
            max_vms=self.max_vms,
            max_scale_up_per_minute=self.max_scale_up_per_minute,
            max_concurrent_assignments=self.max_concurrent_assignments,
        )

    def check(self) -> Policy:
        peak = max([self.min_ready_vms, *(w.min_ready for w in self.warm)])
        if peak > self.max_vms:
            raise SpecError(
                f"policy {self.name!r}: a warm pool of {peak} does not fit max_vms={self.max_vms}; "
                "lower min_ready/warm or raise max_vms"
            )
        return self

    def describe(self) -> str:
        text = (
            f"min_ready={self.min_ready_vms} idle={format_duration(self.idle_timeout)} "
            f"action={self.idle_action} max_vms={self.max_vms} "
            f"rate={self.max_scale_up_per_minute}/min"
        )
        if self.max_concurrent_assignments != 10:
            text += f" inflight={self.max_concurrent_assignments}"
        if self.warm:
            text += " warm=" + "+".join(w.text() for w in self.warm)
        return text

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["warm"] = [w.text() for w in self.warm]
        return out


def format_duration(seconds: float) -> str:
    if seconds % 3600 == 0 and seconds:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


PRESETS: dict[str, Policy] = {
    # The Go controller's defaults (seed: min_ready 2, idle 10 min, stop, 50 VMs, 5/min).
    "seed": Policy("seed"),
    # Room and speed for bursts: a release matrix no longer queues behind 5/min and 50 VMs.
    "burst": Policy(
        "burst", max_vms=100, max_scale_up_per_minute=20, max_concurrent_assignments=20
    ),
    # Suspend instead of stop, after 2 idle minutes: back in ~8 s instead of ~20 s, so
    # idle VMs can go down sooner (pays for memory storage while suspended).
    "suspend": Policy(
        "suspend",
        idle_action="suspend",
        idle_timeout=120.0,
        max_vms=100,
        max_scale_up_per_minute=20,
        max_concurrent_assignments=20,
    ),
    # A warm pool sized to office hours (10 from 07:00 to 19:00, 3 otherwise), suspended VMs.
    "office": Policy(
        "office",
        min_ready_vms=3,
        idle_action="suspend",
        idle_timeout=120.0,
        max_vms=100,
        max_scale_up_per_minute=20,
        max_concurrent_assignments=20,
        warm=(WarmWindow(7 * 3600.0, 19 * 3600.0, 10),),
    ),
}

_KEYS = {
    "base": "a preset to start from (" + ", ".join(PRESETS) + ")",
    "min_ready": "warm pool size (VMs ready with no job)",
    "idle": "idle timeout (600, 10m, 1h)",
    "action": "idle action: stop, suspend or delete",
    "max_vms": "hard limit on VMs",
    "rate": "max VMs created/started per minute",
    "inflight": "max runner registrations in flight",
    "warm": "time-of-day warm pool HH:MM-HH:MM@N[+...]",
}


def policy_help(indent: str = "    ") -> str:
    return "\n".join(f"{indent}{k:<11}{v}" for k, v in _KEYS.items())


def parse_policy(text: str) -> Policy:
    """`NAME[:key=value,...]`. A bare preset name is that preset; with keys, the policy
    starts from `base` (or the preset NAME names, or `seed`) and overrides the keys."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,32}", name):
        raise SpecError(
            f"policy {text!r}: start with a name (letters, digits, - _ . +; at most 32), "
            "e.g. 'fast:min_ready=4,rate=20'"
        )
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS:
            raise SpecError(
                f"policy {name!r}: {item!r} is not key=value with a known key; keys are "
                + ", ".join(_KEYS)
            )
        pairs[key] = value.strip()
    base_name = pairs.pop("base", name if name in PRESETS else "seed")
    if base_name not in PRESETS:
        raise SpecError(f"policy {name!r}: base={base_name!r} is not one of {', '.join(PRESETS)}")
    if not pairs and not rest.strip() and name not in PRESETS:
        raise SpecError(
            f"policy {name!r} is not a preset ({', '.join(PRESETS)}); "
            f"give keys, e.g. '{name}:min_ready=4,idle=20m'"
        )
    policy = replace(PRESETS[base_name], name=name)
    changes: dict[str, object] = {}
    for key, value in pairs.items():
        what = f"policy {name!r} {key}"
        if key == "min_ready":
            changes["min_ready_vms"] = _parse_int(value, what, 0)
        elif key == "idle":
            changes["idle_timeout"] = parse_duration(value, what)
        elif key == "action":
            if value not in IDLE_ACTIONS:
                raise SpecError(f"{what}: expected stop, suspend or delete, got {value!r}")
            changes["idle_action"] = value
        elif key == "max_vms":
            changes["max_vms"] = _parse_int(value, what, 1)
        elif key == "rate":
            changes["max_scale_up_per_minute"] = _parse_int(value, what, 1)
        elif key == "inflight":
            changes["max_concurrent_assignments"] = _parse_int(value, what, 1)
        else:
            changes["warm"] = parse_windows(value) if value else ()
    return replace(policy, **changes).check()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Timings:
    """Seconds each step takes in the simulated cloud.

    create/start/resume run from the MIG call to the agent reporting `ready` (boot
    included); the defaults are measured GCE figures for a small Linux image. `register`
    is register_runner to an idle registered runner; `pickup` is GitHub handing a queued
    job to an idle runner (an assumption, ~1 s of long poll). stop/suspend/delete run
    from the call to the instance being down (suspend and delete assumed like stop).
    `jitter` (a fraction, 0 by default) scales each delay by a factor drawn uniformly
    from [1 - jitter, 1 + jitter] with the run's seed, for a spread like the cloud's.
    """

    create: float = 40.0
    start: float = 20.0
    resume: float = 8.0
    register: float = 2.0
    pickup: float = 1.0
    stop: float = 10.0
    suspend: float = 10.0
    delete: float = 10.0
    jitter: float = 0.0

    def least(self, name: str) -> float:
        """The shortest a step can take with the jitter."""
        return float(getattr(self, name)) * (1.0 - self.jitter)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_timings(text: str) -> Timings:
    """`create=40,start=20,...`: the keys given override the defaults."""
    names = [f.name for f in fields(Timings)]
    changes: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in names:
            raise SpecError(
                f"timings: {item!r} is not key=value with a known key; keys are " + ", ".join(names)
            )
        if key == "jitter":
            try:
                fraction = float(value)
            except ValueError:
                fraction = -1.0
            if not 0.0 <= fraction < 1.0:
                raise SpecError(f"timings jitter: expected a fraction in [0, 1), got {value!r}")
            changes[key] = fraction
            continue
        seconds = parse_duration(value, f"timings {key}")
        if key != "pickup" and seconds <= 0:
            raise SpecError(f"timings {key}: must be more than 0 s")
        changes[key] = seconds
    return replace(Timings(), **changes)
