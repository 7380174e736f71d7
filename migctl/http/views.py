"""Read models for people: the pool, its VMs and jobs, and why a job is where it is.

Shared by the HTTP API, the status page and the `migctl` ops commands. Everything is
read from Redis at call time; nothing here writes, and no secret leaves: a command's
parameters (registration tokens, JIT configs) and dead letters' payloads stay out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import Job, JobState, Vm, VmState, covers
from migctl.domain.scheduler import Assign, Defer, ScaleUp, StartStopped, decide
from migctl.domain.states import ON_THE_WAY, is_free
from migctl.services.assignment import limits_of
from migctl.settings import Settings

SEED_COUNTERS = ("assigned_jobs", "failed_jobs", "started_vms", "created_vms")
ACTIVE_STATES = (JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING)
FINISHED_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
MAX_LIMIT = 1000

# Hops of the per-job timeline hash (store.mark / save(timeline=...)) and of the job record.
TIMELINE_HOPS = (
    ("received", "received"),
    ("queued", "queued"),
    ("decided_at", "decided"),
    ("vm_ready_at", "VM ready"),
    ("command_sent_at", "register_runner sent"),
    ("registered_at", "runner registered"),
)
JOB_HOPS = (
    ("received_at", "received"),
    ("assigned_at", "VM reserved"),
    ("started_at", "started"),
    ("finished_at", "finished"),
)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _f(value: Any) -> float:
    try:
        return float(_s(value))
    except (TypeError, ValueError):
        return 0.0


def _ago(at: float, now: float) -> float | None:
    return round(now - at, 3) if at else None


# -- single records -------------------------------------------------------------------------


def vm_view(vm: Vm, now: float) -> dict[str, Any]:
    return {
        "id": vm.id,
        "state": vm.state.value,
        "infra": vm.infra.value,
        "agent": vm.agent.value,
        "lifecycle": vm.lifecycle.value,
        "connected": vm.connected,
        "unhealthy": vm.unhealthy,
        "free": is_free(vm),
        "runner_registered": vm.runner_registered,
        "registration_pending": bool(vm.cmd_id),
        "job_id": vm.job_id,
        "reserved_job": vm.reserved_job,
        "labels": list(vm.labels),
        "capabilities": list(vm.capabilities),
        "created_at": vm.created_at,
        "state_since": vm.state_since,
        "last_heartbeat": vm.last_heartbeat,
        "heartbeat_age_s": _ago(vm.last_heartbeat, now),
        "last_active": vm.last_active,
    }


def wait_of(job: Job, now: float) -> float | None:
    """Queue-to-start seconds; for a job still waiting, how long so far."""
    if not job.received_at:
        return None
    if job.started_at:
        return round(job.started_at - job.received_at, 3)
    if job.state.terminal:
        return None
    return round(now - job.received_at, 3)


def job_view(job: Job, now: float) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "labels": list(job.labels),
        "org": job.org,
        "repo": job.repo,
        "run_id": job.run_id,
        "priority": job.priority,
        "vm_id": job.vm_id,
        "retries": job.retries,
        "reason": job.reason,
        "conclusion": job.conclusion,
        "received_at": job.received_at,
        "assigned_at": job.assigned_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
        "wait_s": wait_of(job, now),
        "waiting": not job.started_at and not job.state.terminal,
        "assignment_s": (
            round(job.assigned_at - job.received_at, 3)
            if job.assigned_at and job.received_at
            else None
        ),
    }


def pending_commands(store: RedisStore, vm_id: str) -> list[dict[str, Any]]:
    """The VM's outbox, without parameters (a register_runner carries a token)."""
    ids = [_s(i) for i in store.r.lrange(store.k.outbox(vm_id), 0, -1)]
    if not ids:
        return []
    out = []
    for cmd_id, raw in zip(ids, store.r.hmget(store.k.cmds(vm_id), ids), strict=True):
        if raw is None:
            continue
        try:
            command = json.loads(raw)
        except ValueError:
            continue
        out.append(
            {
                "id": cmd_id,
                "type": command.get("type", ""),
                "job_id": command.get("job_id", ""),
                "created_at": command.get("created_at", 0),
                "expires_at": command.get("expires_at", 0),
            }
        )
    return out


def vm_detail(store: RedisStore, vm_id: str, now: float) -> dict[str, Any] | None:
    got = store.get_vm(vm_id)
    if got is None:
        return None
    vm = got[0]
    held = [i for i in (vm.job_id, vm.reserved_job) if i]
    jobs = {job.id: job_view(job, now) for job, _ in store.get_jobs(held)}
    return {
        "pool_id": store.pool_id,
        "vm": vm_view(vm, now),
        "running": jobs.get(vm.job_id),
        "reserved": jobs.get(vm.reserved_job),
        "pending_commands": pending_commands(store, vm_id),
    }


# -- the pool -------------------------------------------------------------------------------


# A replica publishes its session count every second; one silent this long was killed
# (a graceful stop withdraws its entry at once) and its streams are gone with it.
LIVE_GATEWAY_S = 5.0


def live_gateways(raw: Mapping[Any, Any], seen: Mapping[Any, Any], now: float) -> dict[str, int]:
    """Session counts of the replicas still publishing (`gateways`, `gateways:seen`)."""
    last = {_s(k): _f(v) for k, v in seen.items()}
    return {
        _s(k): int(_f(v)) for k, v in raw.items() if now - last.get(_s(k), 0.0) <= LIVE_GATEWAY_S
    }


def gateways(store: RedisStore, now: float | None = None) -> dict[str, int]:
    pipe = store.r.pipeline(transaction=False)
    pipe.hgetall(store.k.prefix + "gateways")
    pipe.hgetall(store.k.prefix + "gateways:seen")
    raw, seen = pipe.execute()
    return live_gateways(raw or {}, seen or {}, time.time() if now is None else now)


def connected_vms(store: RedisStore) -> int:
    """Streams held by the live gateway replicas (the seed's `connected_vms`)."""
    return sum(gateways(store).values())


def canary_age(store: RedisStore, now: float) -> float | None:
    raw = store.r.get(store.k.prefix + "canary")
    return round(now - _f(raw), 3) if raw else None


def vms_by_state(vms: Iterable[Vm]) -> dict[str, int]:
    counts = {state.value: 0 for state in VmState}
    for vm in vms:
        counts[vm.state.value] += 1
    return counts


def active_job_ids(store: RedisStore, vms: Sequence[Vm]) -> dict[JobState, list[str]]:
    """QUEUED (queue order), ASSIGNED (by reservation time) and RUNNING (bound to a VM)."""
    pipe = store.r.pipeline(transaction=False)
    pipe.zrange(store.k.queue, 0, -1)
    pipe.zrange(store.k.assigned, 0, -1)
    queued, assigned = pipe.execute()
    return {
        JobState.QUEUED: [_s(i) for i in queued],
        JobState.ASSIGNED: [_s(i) for i in assigned],
        JobState.RUNNING: sorted({vm.job_id for vm in vms if vm.job_id}),
    }


def stats(store: RedisStore, now: float | None = None) -> dict[str, Any]:
    """The seed's /stats fields, then pool detail, the bridge's and gateways' counters."""
    now = time.time() if now is None else now
    counters = store.counters()
    vms = [vm for vm, _ in store.get_vms()]
    active = active_job_ids(store, vms)
    pipe = store.r.pipeline(transaction=False)
    pipe.zcard(store.k.inflight)
    pipe.llen(store.k.deadletters)
    inflight, dead_kept = (int(n) for n in pipe.execute())
    return {
        "pool_id": store.pool_id,
        "queue_length": len(active[JobState.QUEUED]),
        **{name: counters.get(name, 0) for name in SEED_COUNTERS},
        "connected_vms": connected_vms(store),
        "pool_stats": {
            "total_vms": len(vms),
            "vms_by_state": vms_by_state(vms),
            "jobs_by_state": {state.value: len(ids) for state, ids in active.items()},
            "jobs_finished": {
                "COMPLETED": counters.get("completed_jobs", 0),
                "FAILED": counters.get("failed_jobs", 0),
                "CANCELLED": counters.get("cancelled_jobs", 0),
            },
            "registrations_in_flight": inflight,
            "dead_letters": counters.get("dead_letters", 0),
            "dead_letters_kept": dead_kept,
            "worker_canary_age_s": canary_age(store, now),
        },
        "counters": counters,
        "bridge": store.bridge_stats(),
        "gateways": gateways(store),
        "at": now,
    }


def jobs(
    store: RedisStore,
    now: float,
    states: Sequence[JobState] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Jobs the pool holds: running, assigned, queued (in queue order), then the finished
    ones newest first; filtered by `states`, at most `limit`. Reads only what it shows,
    page by page."""
    wanted = set(states or JobState)
    limit = max(1, min(limit, MAX_LIMIT))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def take(ids: Sequence[str]) -> bool:
        fresh = [i for i in ids if i not in seen]
        seen.update(fresh)
        for job, _ in store.get_jobs(fresh):
            if job.state in wanted:
                out.append(job_view(job, now))
                if len(out) >= limit:
                    return True
        return False

    if wanted & set(ACTIVE_STATES):
        vms = [vm for vm, _ in store.get_vms()] if JobState.RUNNING in wanted else []
        active = active_job_ids(store, vms)
        for state in (JobState.RUNNING, JobState.ASSIGNED, JobState.QUEUED):
            if state in wanted and take(active[state][: limit - len(out)]):
                return out
    if wanted & set(FINISHED_STATES):
        page = max(limit, 50)
        for start in range(0, MAX_LIMIT, page):
            ids = [_s(i) for i in store.r.zrevrange(store.k.recent, start, start + page - 1)]
            if not ids or take(ids):
                break
    return out


def dead_letters(
    store: RedisStore, limit: int = 50, with_data: bool = False
) -> list[dict[str, Any]]:
    """Messages the bridge refused, newest first; the raw payload only when asked."""
    out = []
    for record in store.dead_letters(limit=max(1, min(limit, MAX_LIMIT))):
        if not with_data:
            record = {k: v for k, v in record.items() if k != "data_b64"}
        out.append(record)
    return out


# -- a job's story --------------------------------------------------------------------------


def timeline(job: Job | None, raw: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each hop with its time, the delta from the previous hop and from `received`."""
    points: dict[str, float] = {}
    for key, hop in TIMELINE_HOPS:
        if at := _f(raw.get(key)):
            points[hop] = at
    if job is not None:
        for attr, hop in JOB_HOPS:
            if at := float(getattr(job, attr)):
                points.setdefault(hop, at)
        if "finished" in points:
            points[job.state.value.lower()] = points.pop("finished")
    ordered = sorted(points.items(), key=lambda item: item[1])
    start = points.get("received", ordered[0][1] if ordered else 0.0)
    out = []
    previous = None
    for hop, at in ordered:
        out.append(
            {
                "hop": hop,
                "at": at,
                "delta_s": round(at - previous, 3) if previous is not None else None,
                "since_received_s": round(at - start, 3),
            }
        )
        previous = at
    return out


def _vm_line(vm: Vm, now: float) -> str:
    agent = vm.agent.value or "not heard from"
    heard = f", heard {now - vm.last_heartbeat:.0f}s ago" if vm.last_heartbeat else ""
    link = "connected" if vm.connected else "not connected"
    return f"{vm.id} is {vm.state.value} (agent {agent}, {link}{heard})"


def _waiting_queued(
    store: RedisStore, settings: Settings, job: Job, vms: Sequence[Vm], now: float
) -> tuple[str, str]:
    """(what the pool waits for, why no VM) for a QUEUED job, from the domain's decision."""
    rank: Any = store.r.zrank(store.k.queue, job.id)
    demand = store.queue_length()
    place = f"position {int(rank) + 1} of {demand} in the queue" if rank is not None else ""
    if not covers(settings.pool.labels, job.labels):
        why = f"no VM of this pool has labels {','.join(job.labels)}"
        return f"nothing this pool can do: {why}", why
    in_flight = int(store.r.zcard(store.k.inflight))
    decision = decide(
        job,
        vms,
        demand=demand,
        limits=limits_of(settings),
        assignments_in_flight=in_flight,
        scaled_last_minute=store.scaled_since(now - 60),
    )
    coming = [vm.id for vm in vms if vm.state in ON_THE_WAY]
    if isinstance(decision, Assign):
        text = (
            f"a free VM covers it ({', '.join(decision.vm_ids[:3])}): the next assign_job "
            "claims it (if it stays queued, check that a worker runs: GET /ready)"
        )
        why = "not claimed yet"
    elif isinstance(decision, Defer):
        text = decision.reason
        why = f"no free VM whose labels cover {','.join(job.labels) or 'the job'}"
    else:
        if isinstance(decision, StartStopped):
            parts = []
            if decision.resume:
                parts.append(f"resume {len(decision.resume)}")
            if decision.start:
                parts.append(f"start {len(decision.start)}")
            if decision.then_create:
                parts.append(f"create {decision.then_create}")
            plan = ", ".join(parts)
        else:
            assert isinstance(decision, ScaleUp)
            plan = f"create {decision.count}"
        text = f"the next provisioning pass will {plan} VM(s)"
        why = "no free VM; more capacity is needed"
    if coming:
        text += f"; on the way: {', '.join(coming[:5])}" + (" ..." if len(coming) > 5 else "")
    return (f"{place}; {text}" if place else text), why


def explain(
    store: RedisStore, settings: Settings, job_id: str, now: float | None = None
) -> dict[str, Any] | None:
    """Why the job is where it is: its record, timeline, the last decision and its reason,
    the VM reserved (or why none), and what the pool is waiting for. None if unknown."""
    now = time.time() if now is None else now
    got = store.get_job(job_id)
    raw = store.get_timeline(job_id)
    if got is None and not raw:
        return None
    job = got[0] if got else None
    vm: Vm | None = None
    if job is not None and job.vm_id and (got_vm := store.get_vm(job.vm_id)):
        vm = got_vm[0]
    decision = {"text": raw.get("decision", ""), "at": _f(raw.get("decided_at")) or None}
    vm_why = ""
    if job is None:
        waiting = "the job record is gone (finished jobs are kept 7 days); only its timeline is"
    elif job.state is JobState.QUEUED:
        vms = [v for v, _ in store.get_vms()]
        waiting, vm_why = _waiting_queued(store, settings, job, vms, now)
    elif job.state is JobState.ASSIGNED:
        timeout = settings.scheduler.assignment_timeout
        left = max(0.0, job.assigned_at + timeout - now)
        if vm is None:
            waiting = f"the reserved VM {job.vm_id or '?'} is gone; the sweep requeues the job"
        elif vm.cmd_id:
            waiting = f"the agent on {vm.id} to take register_runner (sent, not acked yet)"
        elif not vm.runner_registered:
            waiting = f"the runner on {vm.id} to register with GitHub"
        else:
            waiting = f"GitHub to hand the job to the runner on {vm.id}"
        waiting += f"; back to the queue in {left:.0f}s if no runner starts it"
    elif job.state is JobState.RUNNING:
        ran = now - job.started_at if job.started_at else 0.0
        waiting = f"the job to finish on {job.vm_id} (running for {ran:.0f}s)"
    else:
        conclusion = f" ({job.conclusion})" if job.conclusion else ""
        waiting = f"nothing: the job is {job.state.value}{conclusion}"
    if job is not None and not vm and not vm_why:
        vm_why = (
            f"VM {job.vm_id} no longer exists"
            if job.vm_id
            else ("it never got one" if job.state.terminal else "none reserved")
        )
    return {
        "pool_id": store.pool_id,
        "job": job_view(job, now) if job else None,
        "timeline": timeline(job, raw),
        "decision": decision,
        "reason": job.reason if job else "",
        "vm": vm_view(vm, now) if vm else None,
        "vm_line": _vm_line(vm, now) if vm else "",
        "no_vm_because": "" if vm else vm_why,
        "waiting_for": waiting,
    }
