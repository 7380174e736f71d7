"""What every fault scenario checks at the end: every job terminal exactly once, no VM
ever held two jobs at once, each job ran on one runner once, and the counts reconcile."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from itertools import pairwise
from typing import Any

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState
from migctl.sim.stack import POOL, LocalStack


def wait_all_terminal(stack: LocalStack, store: RedisStore, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [job for job, _ in store.get_jobs(ids)]
        if len(jobs) == len(ids) and all(j.state.terminal for j in jobs):
            return
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            pytest.fail(f"process(es) died: {dead}\n" + "\n".join(stack.log_tail(n) for n in dead))
        if time.monotonic() > deadline:
            states = Counter(j.state.value for j in jobs)
            missing = len(ids) - len(jobs)
            tail = stack.log_tail("worker")
            pytest.fail(f"jobs not finished: {dict(states)}, {missing} never stored\n{tail}")
        time.sleep(0.5)


def check_exactly_once(stack: LocalStack, ids: list[str], counted: bool = True) -> dict[str, Any]:
    """`counted=False`: the counters restarted mid-run (a wiped Redis), skip their sums."""
    store = RedisStore(stack.redis, POOL)
    jobs = [job for job, _ in store.get_jobs(ids)]
    assert [j.state for j in jobs] == [JobState.COMPLETED] * len(ids), Counter(
        j.state.value for j in jobs
    )
    assert stack.github is not None
    gh = {j["job_id"]: j for j in stack.github.jobs()}
    assert all(gh[i]["state"] == "completed" and gh[i]["runner_name"] for i in ids)
    # Our record of each outcome is GitHub's (a job whose VM vanished failed there).
    wrong = {j.id: (j.conclusion, gh[j.id]["conclusion"]) for j in jobs}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"conclusions differ from GitHub's (ours, GitHub's): {wrong}"
    # No VM ever ran two jobs at once, by GitHub's clock (when each runner took and
    # finished its job): our own timestamps are when workers processed the events, and
    # two events of one VM may be processed in either order.
    per_vm: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i in ids:
        per_vm[gh[i]["runner_name"]].append((gh[i]["started_at"], gh[i]["completed_at"]))
    for vm_id, spans in per_vm.items():
        for (_, end), (start, _) in pairwise(sorted(spans)):
            assert start >= end, f"{vm_id} ran two jobs at once: {spans}"
    # And each job is bound, in our records, to the VM GitHub ran it on.
    assert all(j.vm_id == gh[j.id]["runner_name"] for j in jobs)
    counters = store.counters()
    if not counted:
        return counters
    # Each job moved to COMPLETED exactly once (the counter is written in the same atomic
    # step as the transition), and nothing failed.
    assert counters.get("completed_jobs", 0) == len(ids), counters
    assert counters.get("failed_jobs", 0) == 0, counters
    return counters


def check_no_orphans(stack: LocalStack, timeout: float = 60) -> dict[str, int]:
    """Settled, the records match the world: every VM the MIG lists is ours and every VM
    record is a VM the MIG lists; every runner GitHub still has belongs to a live VM."""
    from migctl.sim.mig import SimMig

    assert stack.github is not None
    store = RedisStore(stack.redis, POOL)
    mig = SimMig(stack.mig_redis, POOL)
    deadline = time.monotonic() + timeout
    while True:
        listed = {vm.name for vm in mig.list()}
        recorded = {vm.id for vm, _ in store.get_vms()}
        runners = {r["name"] for r in stack.github.runners()}
        orphan_runners = runners - listed
        if listed == recorded and not orphan_runners:
            return {"vms": len(listed), "runners": len(runners)}
        if time.monotonic() > deadline:
            pytest.fail(
                f"records never matched the world: MIG only {sorted(listed - recorded)}, "
                f"records only {sorted(recorded - listed)}, "
                f"runners without a VM {sorted(orphan_runners)}"
            )
        time.sleep(0.5)
