"""A trace from GitHub's own record of jobs: the JSON of
`GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs` (one response, a list of
responses, or a list of job items), e.g. saved with
`gh api --paginate repos/O/R/actions/runs/ID/jobs > jobs.json` for each run of a day.

arrival = created_at, duration = completed_at - started_at, and the wait the job really
had (started_at - created_at) is kept to compare with. Jobs that never ran on a runner
(skipped, cancelled while queued, not completed) are left out and counted. Time 0 is
00:00 UTC of the first job's day, so time-of-day warm windows read as UTC.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from migctl.simulate.trace import Trace, TraceError, TraceJob


def _time(value: Any, what: str, where: str) -> datetime:
    if not isinstance(value, str) or not value:
        raise TraceError(f"{where}: {what} must be an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TraceError(f"{where}: {what} is not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _items(data: Any, source: str) -> list[Any]:
    if isinstance(data, dict):
        if not isinstance(data.get("jobs"), list):
            raise TraceError(
                f"{source}: expected the JSON of GET .../actions/runs/ID/jobs "
                "(an object with a 'jobs' list)"
            )
        return list(data["jobs"])
    if isinstance(data, list):
        out: list[Any] = []
        for page in data:
            out.extend(page["jobs"] if isinstance(page, dict) and "jobs" in page else [page])
        return out
    raise TraceError(f"{source}: expected a JSON object or list, got {type(data).__name__}")


def from_github(data: Any, source: str = "github jobs") -> Trace:
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    rows: list[tuple[datetime, datetime, datetime, tuple[str, ...], str]] = []
    for i, item in enumerate(_items(data, source)):
        where = f"{source}: job {i}"
        if not isinstance(item, dict):
            raise TraceError(f"{where}: expected an object, got {type(item).__name__}")
        job_id = str(item.get("id", f"gh{i}"))
        if "created_at" not in item:
            raise TraceError(f"{where}: no created_at; is this a jobs listing?")
        if job_id in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(job_id)
        if item.get("status") not in (None, "completed"):
            skipped[f"status {item.get('status')}"] += 1
            continue
        if item.get("conclusion") == "skipped":
            skipped["conclusion skipped"] += 1
            continue
        if not item.get("started_at") or not item.get("completed_at"):
            skipped["never started"] += 1
            continue
        if "runner_name" in item and not item.get("runner_name"):
            skipped["no runner (cancelled while queued)"] += 1
            continue
        labels = item.get("labels")
        if not isinstance(labels, list) or not labels:
            raise TraceError(f"{where}: labels must be a non-empty list, got {labels!r}")
        created = _time(item["created_at"], "created_at", where)
        started = _time(item["started_at"], "started_at", where)
        completed = _time(item["completed_at"], "completed_at", where)
        rows.append((created, started, completed, tuple(str(x) for x in labels), job_id))
    if not rows:
        why = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "none listed"
        raise TraceError(f"{source}: no completed job that ran on a runner ({why})")
    first = min(row[0] for row in rows).astimezone(UTC)
    origin = first.replace(hour=0, minute=0, second=0, microsecond=0)
    jobs = [
        TraceJob(
            arrival=(created - origin).total_seconds(),
            labels=labels,
            duration=max(0.0, (completed - started).total_seconds()),
            id=job_id,
            observed_wait=max(0.0, (started - created).total_seconds()),
        )
        for created, started, completed, labels, job_id in rows
    ]
    meta = {
        "origin": origin.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "source": "github jobs API",
    }
    if skipped:
        meta["left_out"] = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
    name = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return Trace(tuple(jobs), name, 0.0, meta)
