"""The whole path on real parts: the Procfile's processes as subprocesses, the Pub/Sub
emulator, a real redis-server, simulated agents over real gRPC and a fake GitHub."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from itertools import pairwise

import pytest
import requests

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState
from migctl.sim.pubsub_emulator import find_emulator
from migctl.sim.stack import POOL, LocalStack, StackOptions
from tests.helpers import require

pytestmark = [pytest.mark.e2e, pytest.mark.emulator, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 50


def wait_for(predicate, timeout: float, what: str, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in dead)
            pytest.fail(f"process(es) died while waiting for {what}: {dead}\n{logs}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack():
    require(find_emulator() is not None, "the Pub/Sub emulator")
    s = LocalStack(
        StackOptions(
            use_emulator=True,
            workers=1,
            concurrency=2,
            min_ready_vms=2,
            max_vms=12,
            job_duration=0.5,
            create_s=1.0,
            log_level="info",
        )
    )
    s.start()
    yield s
    s.stop()


def test_fifty_jobs_complete_once_each_and_a_bad_message_is_dead_lettered(
    stack: LocalStack,
) -> None:
    store = RedisStore(stack.redis, POOL)
    first = stack.submit(JOBS // 2)
    stack.publish(b"{not json", {})  # malformed: dead-lettered, flow goes on
    stack.publish(json.dumps({"job_id": 7, "labels": []}).encode(), {})  # invalid fields
    rest = stack.submit(JOBS - len(first))
    ids = first + rest

    def all_terminal() -> bool:
        jobs = store.get_jobs(ids)
        return len(jobs) == JOBS and all(job.state.terminal for job, _ in jobs)

    wait_for(all_terminal, 300, f"{JOBS} jobs to finish", stack)
    jobs = [job for job, _ in store.get_jobs(ids)]
    assert [j.state for j in jobs] == [JobState.COMPLETED] * JOBS, [
        (j.id, j.state, j.reason) for j in jobs
    ]

    # GitHub's side agrees: each job ran once, on one of our runners.
    assert stack.github is not None
    gh = {j["job_id"]: j for j in stack.github.jobs()}
    assert all(gh[i]["state"] == "completed" and gh[i]["conclusion"] == "success" for i in ids)
    vm_ids = {vm.id for vm, _ in store.get_vms()}
    assert {gh[i]["runner_name"] for i in ids} <= vm_ids

    # No VM ever ran two jobs at once, by GitHub's clock (when each runner took and
    # finished its job; our own timestamps are when workers processed the events), and
    # each job is bound in our records to the VM GitHub ran it on.
    per_vm = defaultdict(list)
    for job in jobs:
        assert job.vm_id == gh[job.id]["runner_name"]
        per_vm[job.vm_id].append((gh[job.id]["started_at"], gh[job.id]["completed_at"]))
    for vm_id, spans in per_vm.items():
        for (_, end), (start, _) in pairwise(sorted(spans)):
            assert start >= end, f"{vm_id} ran two jobs at once: {spans}"

    # Both bad messages were dead-lettered with their reasons, and nothing else was.
    def two_dead_letters() -> bool:
        return len(store.dead_letters()) == 2

    wait_for(two_dead_letters, 30, "two dead letters", stack)
    reasons = sorted(d["reason"] for d in store.dead_letters())
    assert any("not JSON" in r for r in reasons), reasons
    assert any("labels" in r for r in reasons), reasons

    counters = store.counters()
    assert counters["assigned_jobs"] >= JOBS
    assert counters.get("failed_jobs", 0) == 0
    assert counters["created_vms"] <= 12

    # The operator endpoints answer with the seed's fields.
    base = f"http://127.0.0.1:{stack.ports['http']}"
    stats = requests.get(f"{base}/stats", timeout=5).json()
    for field in (
        "queue_length",
        "assigned_jobs",
        "failed_jobs",
        "started_vms",
        "created_vms",
        "connected_vms",
    ):
        assert field in stats, field
    assert stats["queue_length"] == 0
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    flower = f"http://127.0.0.1:{stack.ports['flower']}"
    assert requests.get(f"{flower}/healthcheck", timeout=5).status_code == 200
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401  # behind auth
    tasks = requests.get(f"{flower}/api/tasks", auth=("admin", "local-only"), timeout=10)
    assert tasks.status_code == 200
    seen = tasks.json().values()
    assert any(t.get("name") == "migctl.assign_job" for t in seen), list(seen)[:3]
    # Task arguments are ids only: nothing that looks like a credential.
    assert not [t for t in seen if "token" in str(t.get("args", "")).lower()]


def test_a_job_submitted_later_is_served_by_the_warm_pool(stack: LocalStack) -> None:
    store = RedisStore(stack.redis, POOL)
    [job_id] = stack.submit(1)

    def done() -> bool:
        got = store.get_job(job_id)
        return got is not None and got[0].state is JobState.COMPLETED

    wait_for(done, 60, "the late job", stack)
