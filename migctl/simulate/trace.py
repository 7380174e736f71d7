"""Job traces: when each job arrives, which labels it needs, how long it runs.

Times are seconds from the trace's origin, 00:00 of its first day (so time-of-day
policies line up). On disk a trace is CSV (`arrival_s,labels,duration_s`, labels
joined by `;`, `# key: value` lines for metadata) or JSON (`{"jobs": [{"arrival_s",
"labels", "duration_s"}...]}` or the bare list). A GitHub jobs export is read by
`github_import`; `load` tells the shapes apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

BUNDLED = ("workday",)
FORMATS = ("auto", "csv", "json", "github")


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class TraceJob:
    arrival: float
    labels: tuple[str, ...]
    duration: float
    id: str = ""
    observed_wait: float | None = None  # how long it really waited (imported traces)


@dataclass(frozen=True)
class Trace:
    jobs: tuple[TraceJob, ...]
    name: str = ""
    horizon: float = 0.0  # VM-hours are counted until here (or the last job's end)
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.jobs, key=lambda j: j.arrival))
        numbered = tuple(
            job if job.id else TraceJob(job.arrival, job.labels, job.duration, f"j{i:05d}")
            for i, job in enumerate(ordered, 1)
        )
        object.__setattr__(self, "jobs", numbered)
        object.__setattr__(self, "horizon", max(self.horizon, default_horizon(numbered)))

    def only(self, keep: Iterable[TraceJob]) -> Trace:
        return Trace(tuple(keep), self.name, self.horizon, self.meta)


def default_horizon(jobs: Sequence[TraceJob]) -> float:
    """The end of the last job, rounded up to a whole hour."""
    if not jobs:
        return 0.0
    return math.ceil(max(j.arrival + j.duration for j in jobs) / 3600.0) * 3600.0


def split_labels(text: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[;|\s]+", text.strip()) if part)


def _number(value: object, what: str, where: str, low: float) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < low:
        raise TraceError(f"{where}: {what} must be at least {low:g}, got {value!r}")
    return number


def _job(arrival: object, labels: object, duration: object, where: str, **extra: Any) -> TraceJob:
    if isinstance(labels, str):
        labels = split_labels(labels)
    if not isinstance(labels, list | tuple) or not all(isinstance(x, str) for x in labels):
        raise TraceError(f"{where}: labels must be a list of strings, got {labels!r}")
    if not labels:
        raise TraceError(f"{where}: a job needs at least one label (e.g. self-hosted)")
    return TraceJob(
        arrival=_number(arrival, "arrival_s", where, 0.0),
        labels=tuple(labels),
        duration=_number(duration, "duration_s", where, 0.0),
        **extra,
    )


def _first(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def parse_csv(text: str, source: str = "trace") -> Trace:
    meta: dict[str, str] = {}
    body: list[tuple[int, str]] = []  # (line number, line) of the CSV proper
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                meta[key.strip()] = value.strip()
        elif line.strip():
            body.append((number, line))
    reader = csv.DictReader(line for _, line in body)
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    need = (("arrival_s", "arrival"), ("labels",), ("duration_s", "duration"))
    missing = [names[0] for names in need if not set(names) & set(header)]
    if missing:
        raise TraceError(
            f"{source}: the CSV header must name arrival_s, labels, duration_s "
            f"(missing {', '.join(missing)}; got {', '.join(header) or 'nothing'})"
        )
    jobs = []
    for row in reader:
        where = f"{source}:{body[reader.line_num - 1][0]}"
        if None in row:
            raise TraceError(f"{where}: more fields than the header has (labels use ';')")
        wait = _first(row, "observed_wait_s")
        jobs.append(
            _job(
                _first(row, "arrival_s", "arrival"),
                row.get("labels") or "",
                _first(row, "duration_s", "duration"),
                where,
                id=(row.get("id") or "").strip(),
                observed_wait=None if wait is None else _number(wait, "observed_wait_s", where, 0),
            )
        )
    return _finish(jobs, source, meta)


def parse_json(data: Any, source: str = "trace") -> Trace:
    meta: dict[str, str] = {}
    horizon = 0.0
    items = data
    if isinstance(data, dict):
        items = data.get("jobs")
        horizon = _number(data.get("horizon_s", 0), "horizon_s", source, 0.0)
        meta = {str(k): str(v) for k, v in (data.get("meta") or {}).items()}
        meta.setdefault("name", str(data.get("name", "")))
    if not isinstance(items, list):
        raise TraceError(
            f"{source}: expected a list of jobs or an object with a 'jobs' list "
            '(each {"arrival_s": 0, "labels": ["self-hosted"], "duration_s": 60})'
        )
    jobs = []
    for i, item in enumerate(items):
        where = f"{source}: jobs[{i}]"
        if not isinstance(item, dict):
            raise TraceError(f"{where}: expected an object, got {type(item).__name__}")
        arrival = _first(item, "arrival_s", "arrival")
        duration = _first(item, "duration_s", "duration")
        if arrival is None or duration is None or "labels" not in item:
            raise TraceError(f"{where}: needs arrival_s, labels and duration_s")
        wait = _first(item, "observed_wait_s")
        jobs.append(
            _job(
                arrival,
                item["labels"],
                duration,
                where,
                id=str(item.get("id", "")),
                observed_wait=None if wait is None else _number(wait, "observed_wait_s", where, 0),
            )
        )
    trace = _finish(jobs, source, meta)
    return Trace(trace.jobs, trace.name, max(horizon, trace.horizon), trace.meta)


def _finish(jobs: list[TraceJob], source: str, meta: Mapping[str, str]) -> Trace:
    if not jobs:
        raise TraceError(f"{source}: the trace has no jobs")
    horizon = float(meta.get("horizon_s", 0) or 0)
    name = meta.get("name") or Path(source).stem
    return Trace(tuple(jobs), name, horizon, dict(meta))


def looks_like_github(data: Any) -> bool:
    items: Any = data
    if isinstance(data, dict):
        items = data.get("jobs")
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "jobs" in data[0]:
        items = data[0]["jobs"]
    return (
        isinstance(items, list)
        and bool(items)
        and isinstance(items[0], dict)
        and "created_at" in items[0]
    )


def load(path: str, fmt: str = "auto") -> Trace:
    """A trace from a file, or a bundled one by name (`workday`)."""
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if path in BUNDLED and not Path(path).exists():
        text = resources.files("migctl.sim").joinpath(f"traces/{path}.csv").read_text()
        return parse_csv(text, f"{path} (bundled)")
    file = Path(path)
    if not file.is_file():
        raise TraceError(
            f"no trace file at {path}: give a CSV or JSON trace, "
            f"'{BUNDLED[0]}' for the bundled one, or --generate workday"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read {path}: {exc}") from None
    suffix, first = file.suffix.lower(), text.lstrip()[:1]
    json_like = suffix == ".json" or (suffix != ".csv" and first in ("[", "{"))
    if fmt == "csv" or (fmt == "auto" and not json_like):
        return parse_csv(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); CSV traces need a .csv name"
        ) from None
    if fmt == "github" or (fmt == "auto" and looks_like_github(data)):
        from migctl.simulate.github_import import from_github

        return from_github(data, path)
    return parse_json(data, path)


def to_csv(trace: Trace) -> str:
    out = io.StringIO()
    meta = {"name": trace.name, **trace.meta, "horizon_s": f"{trace.horizon:g}"}
    for key, value in meta.items():
        out.write(f"# {key}: {value}\n")
    waits = any(j.observed_wait is not None for j in trace.jobs)
    # Ids are written unless they are the ones numbering would give back.
    ids = any(job.id != f"j{i:05d}" for i, job in enumerate(trace.jobs, 1))
    writer = csv.writer(out, lineterminator="\n")
    header = ["arrival_s", "labels", "duration_s"] + ["id"] * ids
    writer.writerow([*header, "observed_wait_s"] if waits else header)
    for job in trace.jobs:
        row = [f"{job.arrival:.1f}", ";".join(job.labels), f"{job.duration:.0f}"]
        if ids:
            row.append(job.id)
        if waits:
            row.append("" if job.observed_wait is None else f"{job.observed_wait:.0f}")
        writer.writerow(row)
    return out.getvalue()


def to_json(trace: Trace) -> str:
    jobs: list[dict[str, object]] = []
    for job in trace.jobs:
        item: dict[str, object] = {
            "id": job.id,
            "arrival_s": job.arrival,
            "labels": list(job.labels),
            "duration_s": job.duration,
        }
        if job.observed_wait is not None:
            item["observed_wait_s"] = job.observed_wait
        jobs.append(item)
    meta = {k: v for k, v in trace.meta.items() if k not in ("name", "horizon_s")}
    body = {"name": trace.name, "horizon_s": trace.horizon, "meta": meta, "jobs": jobs}
    return json.dumps(body, indent=1, sort_keys=True) + "\n"
