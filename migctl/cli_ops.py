"""`migctl status|vms|jobs|explain|deadletters|drain|cancel`: the operator's commands.

They read and write the pool's Redis directly (the same views and admin writes as the
HTTP API), so they work with no gateway up. The config comes from --config, else
$MIGCTL_CONFIG, else the local world `migctl up --keep-running` left in this directory.
Every command takes --json; failures print one line saying what to do and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STATE_FILE = Path(".migctl") / "stack.json"


class OpsError(Exception):
    """A failure for people: the message says what happened and what to do next."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- wiring ---------------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        return str(args.config)
    if os.environ.get("MIGCTL_CONFIG"):
        return None  # load_settings reads it and names it in its errors
    if STATE_FILE.exists():
        try:
            return str(json.loads(STATE_FILE.read_text())["config"])
        except (ValueError, KeyError, OSError) as exc:
            raise OpsError(f"{STATE_FILE} is unreadable ({exc}); pass --config PATH") from None
    return None


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    """(settings, store) for the chosen config; Redis is not contacted yet."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from migctl.adapters.redis_store import RedisStore
    from migctl.runtime import redis_client
    from migctl.settings import ConfigError, load_settings

    path = _config_path(args)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        hint = (
            ""
            if path or os.environ.get("MIGCTL_CONFIG")
            else "; no config given: pass --config PATH, set MIGCTL_CONFIG, or start the "
            "local world here with `migctl up --keep-running`"
        )
        raise OpsError(f"{exc}{hint}") from None
    # One attempt: a person waits on this, and the message says what to check.
    client = redis_client(settings, retry=Retry(NoBackoff(), 0))
    return settings, RedisStore(client, settings.pool.id)


def _unreachable(settings: Any, exc: Exception) -> OpsError:
    ep = settings.redis.jobs
    return OpsError(
        f"cannot reach Redis at {ep.host}:{ep.port} (pool {settings.pool.id}): "
        f"{str(exc).rstrip('.')}. "
        "Is the stack running? Check redis.jobs in the config (or REDIS_JOBS_HOST), or "
        "start the local world with `migctl up --keep-running`."
    )


def _run(
    func: Callable[[argparse.Namespace, Any, Any], int],
) -> Callable[[argparse.Namespace], int]:
    """Open the store, run the command, turn Redis and user errors into one line + exit 2."""

    def command(args: argparse.Namespace) -> int:
        import redis

        from migctl.domain.errors import TemporaryError

        try:
            settings, store = _open(args)
            try:
                return func(args, settings, store)
            except (TemporaryError, redis.ConnectionError, redis.TimeoutError) as exc:
                raise _unreachable(settings, exc) from None
        except OpsError as exc:
            print(f"migctl {args.command}: {exc}", file=sys.stderr)
            return exc.code
        except BrokenPipeError:  # `migctl jobs | head`
            return 0

    return command


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    print(json.dumps(data, indent=1, default=str) if args.json else text())
    return 0


# -- formatting -----------------------------------------------------------------------------


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 60:
        return f"{value:.1f}s"
    if abs(value) < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{value / 3600:.1f}h"


def clock(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        ["-" if c in (None, "") else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def vm_rows(vms: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            vm["id"],
            vm["state"],
            vm["agent"] or "-",
            vm["job_id"],
            vm["reserved_job"],
            "" if vm["heartbeat_age_s"] is None else secs(vm["heartbeat_age_s"]) + " ago",
        ]
        for vm in vms
    ]


VM_HEADERS = ("VM", "STATE", "AGENT", "JOB", "RESERVED FOR", "HEARTBEAT")
JOB_HEADERS = ("JOB", "STATE", "REPO", "VM", "WAIT", "REASON")


def job_rows(jobs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            job["id"],
            job["state"],
            job["repo"],
            job["vm_id"],
            secs(job["wait_s"]) + (" so far" if job["waiting"] and job["wait_s"] else ""),
            (job["reason"] or job["conclusion"])[:70],
        ]
        for job in jobs
    ]


def status_text(
    stats: dict[str, Any],
    vms: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    dead: list[dict[str, Any]],
) -> str:
    pool = stats["pool_stats"]
    canary = pool["worker_canary_age_s"]
    worker = (
        "no worker has run the canary task (is beat running?)"
        if canary is None
        else f"canary ran {secs(canary)} ago"
        + (" (stale: are workers up?)" if canary > 120 else "")
    )
    states = "  ".join(f"{s} {n}" for s, n in pool["vms_by_state"].items() if n) or "none"
    out = [
        f"pool {stats['pool_id']}",
        f"  queue {stats['queue_length']}   assigned {pool['jobs_by_state']['ASSIGNED']}   "
        f"running {pool['jobs_by_state']['RUNNING']}   connected VMs {stats['connected_vms']}",
        f"  totals: assigned {stats['assigned_jobs']}, failed {stats['failed_jobs']}, "
        f"VMs started {stats['started_vms']}, created {stats['created_vms']}, "
        f"dead letters {pool['dead_letters']}",
        f"  worker: {worker}",
        f"  VMs ({pool['total_vms']}): {states}",
        "",
        table(VM_HEADERS, vm_rows(vms)) if vms else "no VMs",
        "",
        table(JOB_HEADERS, job_rows(jobs)) if jobs else "no jobs",
    ]
    if dead:
        out += ["", f"dead letters (newest {len(dead)}; `migctl deadletters` for more):"]
        out += [
            f"  {clock(d.get('at'))}  {d.get('message_id', '-')}  {d.get('reason', '')}"
            for d in dead
        ]
    return "\n".join(out)


def explain_text(story: dict[str, Any]) -> str:
    job = story["job"]
    if job:
        head = f"job {job['id']}  {job['state']}"
        if job["repo"]:
            head += f"  {job['repo']}"
        head += f"  labels {','.join(job['labels'])}"
        if job["retries"]:
            head += f"  retries {job['retries']}"
    else:
        head = "job (record expired)"
    lines = [head, ""]
    rows = [
        [
            hop["hop"],
            clock(hop["at"]),
            "" if hop["delta_s"] is None else f"+{secs(hop['delta_s'])}",
            secs(hop["since_received_s"]),
        ]
        for hop in story["timeline"]
    ]
    lines.append(
        table(("HOP", "AT (UTC)", "DELTA", "SINCE RECEIVED"), rows) if rows else "no timeline"
    )
    lines.append("")
    decision = story["decision"]
    if decision["text"]:
        lines.append(f"last decision: {decision['text']} (at {clock(decision['at'])})")
    if story["reason"]:
        lines.append(f"reason:        {story['reason']}")
    lines.append(f"VM:            {story['vm_line'] or 'none: ' + story['no_vm_because']}")
    lines.append(f"waiting for:   {story['waiting_for']}")
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.domain.model import JobState
    from migctl.http import views

    now = time.time()
    stats = views.stats(store, now)
    vms = [views.vm_view(vm, now) for vm, _ in store.get_vms()]
    active = views.jobs(store, now, [JobState.RUNNING, JobState.ASSIGNED, JobState.QUEUED], 20)
    recent = views.jobs(store, now, [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED], 10)
    dead = views.dead_letters(store, 3)
    data = {**stats, "vms": vms, "jobs": active + recent, "recent_dead_letters": dead}
    return _emit(args, data, lambda: status_text(stats, vms, active + recent, dead))


def cmd_vms(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.http import views

    now = time.time()
    vms = [views.vm_view(vm, now) for vm, _ in store.get_vms()]
    if args.state:
        wanted = {s.strip().upper() for s in args.state.split(",")}
        vms = [vm for vm in vms if vm["state"] in wanted]
    return _emit(args, vms, lambda: table(VM_HEADERS, vm_rows(vms)) if vms else "no VMs")


def cmd_jobs(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.domain.model import JobState
    from migctl.http import views

    states = None
    if args.state:
        try:
            states = [JobState(s.strip().upper()) for s in args.state.split(",")]
        except ValueError:
            raise OpsError(
                f"unknown state in {args.state!r}; one of {', '.join(s.value for s in JobState)}"
            ) from None
    jobs = views.jobs(store, time.time(), states, args.limit)
    return _emit(args, jobs, lambda: table(JOB_HEADERS, job_rows(jobs)) if jobs else "no jobs")


def cmd_explain(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.http import views

    story = views.explain(store, settings, args.job)
    if story is None:
        raise OpsError(
            f"no job {args.job} in pool {store.pool_id} (finished jobs are kept 7 days); "
            "`migctl jobs` lists the jobs the pool holds"
        )
    return _emit(args, story, lambda: explain_text(story))


def cmd_deadletters(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.http import views

    records = views.dead_letters(store, args.limit, with_data=args.with_data)

    def text() -> str:
        if not records:
            return "no dead letters"
        rows = [
            [
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.get("at", 0))),
                r.get("message_id"),
                r.get("reason"),
            ]
            for r in records
        ]
        return table(("AT (UTC)", "MESSAGE", "REASON"), rows)

    return _emit(args, records, text)


def cmd_drain(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.http.admin import AdminError, drain_vm

    try:
        done = drain_vm(store, settings, args.vm, time.time())
    except AdminError as exc:
        raise _refused(exc, "`migctl vms` lists the pool's VMs") from None
    data = {
        "vm_id": done.vm_id,
        "state": "DRAINING",
        "already_draining": done.already,
        "command_id": done.command_id,
    }
    return _emit(
        args,
        data,
        lambda: (
            f"VM {done.vm_id} was already draining"
            if done.already
            else f"VM {done.vm_id} is DRAINING: the agent removes its runner, then the idle pass "
            "stops it"
        ),
    )


def cmd_cancel(args: argparse.Namespace, settings: Any, store: Any) -> int:
    from migctl.http import views
    from migctl.http.admin import AdminError, cancel_job

    try:
        done = cancel_job(
            store, args.job, reason=args.reason, now=time.time(), dispatch=_Celery(settings)
        )
    except AdminError as exc:
        raise _refused(exc, "`migctl jobs` lists the jobs the pool holds") from None
    data = {"job": views.job_view(done.job, time.time()), "freed_vms": list(done.freed)}
    freed = f"; VM {', '.join(done.freed)} back in the pool" if done.freed else ""
    return _emit(args, data, lambda: f"job {done.job.id} CANCELLED{freed}")


class _Celery:
    """The Celery dispatcher, made on first use (only a cancel that frees a VM needs it)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._dispatch: Any = None

    def _get(self) -> Any:
        if self._dispatch is None:
            from migctl.runtime import use_settings
            from migctl.worker.dispatch import CeleryDispatcher

            use_settings(self.settings)  # the app is built from these, not $MIGCTL_CONFIG
            self._dispatch = CeleryDispatcher(self.settings)
        return self._dispatch

    def assign_job(self, job_id: str) -> None:
        self._get().assign_job(job_id)

    def assign_vm(self, vm_id: str) -> None:
        self._get().assign_vm(vm_id)

    def provision(self) -> None:
        self._get().provision()


def _refused(exc: Any, hint: str) -> OpsError:
    if exc.status == 404:
        return OpsError(f"{exc}; {hint}")
    return OpsError(str(exc), code=1)


# -- parser ---------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add the ops commands to `migctl`'s sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="controller YAML (default: $MIGCTL_CONFIG, else the local world of "
        "`migctl up --keep-running` in this directory)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def add(
        name: str, func: Callable[..., int], text: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=text, description=text, **kwargs
        )
        p.set_defaults(func=_run(func))
        return p

    add("status", cmd_status, "the pool at a glance: counts, VMs, jobs in flight, recent jobs")
    p = add("vms", cmd_vms, "the pool's VMs with their effective state")
    p.add_argument("--state", help="only these states, comma-separated (e.g. READY,IDLE)")
    p = add("jobs", cmd_jobs, "jobs: running, assigned, queued, then finished (newest first)")
    p.add_argument("--state", help="only these states, comma-separated (e.g. QUEUED,FAILED)")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p = add(
        "explain",
        cmd_explain,
        "why a job is where it is: its timeline, the last decision, its VM, what the pool "
        "waits for",
    )
    p.add_argument("job", metavar="JOB", help="the GitHub workflow job id")
    p = add(
        "deadletters",
        cmd_deadletters,
        "messages the bridge refused, newest first",
        aliases=["dead-letters"],
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--with-data", action="store_true", help="include the raw payload (base64)")
    p = add(
        "drain",
        cmd_drain,
        "drain a free VM: its agent removes the runner, then the idle pass stops it",
    )
    p.add_argument("vm", metavar="VM", help="the VM id (instance name)")
    p = add(
        "cancel",
        cmd_cancel,
        "end a job CANCELLED in migctl (not on GitHub); a VM reserved for it is released",
    )
    p.add_argument("job", metavar="JOB", help="the GitHub workflow job id")
    p.add_argument("--reason", default="", help="recorded in the job's reason")
