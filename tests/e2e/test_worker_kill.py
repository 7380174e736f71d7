"""kill -9 the Celery worker (main process and pool children) again and again while jobs
flow: acks_late + reject_on_worker_lost redeliver, the tasks are idempotent, and every
job still runs exactly once."""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter, defaultdict
from itertools import pairwise

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState
from migctl.sim.stack import POOL, LocalStack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 40
KILLS = 12
PAUSES = "assign.after_claim=0.3,events.before_save=0.1,events.after_save=0.1"


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the stack")
        time.sleep(0.02)


def seen(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_jobs_complete_exactly_once_while_the_worker_is_killed(tmp_path) -> None:
    rng = random.Random(20261204)
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            concurrency=2,
            min_ready_vms=2,
            max_vms=10,
            job_duration=0.3,
            create_s=1.0,
            visibility_timeout=4.0,
            log_level="info",
            extra={"scheduler.assignment_timeout": "20s"},
            # Widen the windows inside the tasks so the kills land mid-task.
            env={"MIGCTL_FAULT_PAUSES": PAUSES},
        ),
        workdir=tmp_path,
    ).start()
    try:
        store = RedisStore(stack.redis, POOL)
        wait_until(lambda: sum(vm.state.value == "READY" for vm, _ in store.get_vms()) >= 2, 60)
        ids: list[str] = []
        kills = rounds = 0
        while kills < KILLS and rounds < 4 * KILLS:
            rounds += 1
            ids += stack.submit(rng.randint(2, 5))
            # Kill only while a task holds an unacked message (mid-task), at a random offset.
            if not seen(lambda: stack.redis.hlen("unacked") > 0, 5):
                continue
            time.sleep(rng.uniform(0.0, 0.2))
            stack.stop_process("worker", signal.SIGKILL)
            kills += 1
            time.sleep(rng.uniform(0.0, 0.5))
            stack._spawn("worker", "worker")
        assert kills >= KILLS - 2, f"only {kills} kills landed mid-task"
        ids += stack.submit(JOBS - len(ids)) if len(ids) < JOBS else []
        deadline = time.monotonic() + 300
        while True:
            jobs = [job for job, _ in store.get_jobs(ids)]
            if len(jobs) == len(ids) and all(j.state.terminal for j in jobs):
                break
            if time.monotonic() > deadline:
                states = Counter(j.state.value for j in jobs)
                tail = stack.log_tail("worker")
                pytest.fail(f"not all jobs finished after {kills} kills: {states}\n{tail}")
            time.sleep(0.5)
        assert [j.state for j in jobs] == [JobState.COMPLETED] * len(ids)
        assert stack.github is not None
        ran = Counter(j["runner_name"] for j in stack.github.jobs() if j["job_id"] in set(ids))
        assert sum(ran.values()) == len(ids)  # each job handed to exactly one runner, once
        gh = {j["job_id"]: j for j in stack.github.jobs()}
        per_vm = defaultdict(list)  # by GitHub's clock: runner-side truth
        for job in jobs:
            assert job.vm_id == gh[job.id]["runner_name"]
            per_vm[job.vm_id].append((gh[job.id]["started_at"], gh[job.id]["completed_at"]))
        for vm_id, spans in per_vm.items():
            for (_, end), (start, _) in pairwise(sorted(spans)):
                assert start >= end, f"{vm_id} ran two jobs at once"
        assert store.counters().get("failed_jobs", 0) == 0
        # The kills did land inside tasks: some task ids were received again.
        log = stack.log_tail("worker", 10**6)
        received = re.findall(r"Task (migctl\.\w+\[[0-9a-f-]+\]) received", log)
        redelivered = [t for t, n in Counter(received).items() if n > 1]
        assert redelivered, "no task was redelivered: the kills missed every task"
    finally:
        stack.stop()
