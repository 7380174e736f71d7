"""kill -9 the Celery worker (main process and pool children) again and again while jobs
flow: acks_late + reject_on_worker_lost redeliver, the tasks are idempotent, and every
job still runs exactly once."""

from __future__ import annotations

import json
import random
import re
import signal
import time
from collections import Counter

import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.sim.stack import POOL, LocalStack, StackOptions
from migctl.worker.queues import KINDS, queue
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 200
KILLS = 20
PAUSES = "assign.after_claim=0.3,events.before_save=0.1,events.after_save=0.1"


def held_task_ids(r: redis.Redis) -> set[str]:
    """Ids of the tasks kombu still holds: taken but not acked, or waiting in a queue."""
    held = {json.loads(raw)[0]["headers"]["id"] for raw in r.hvals("unacked")}
    for kind in KINDS:
        for key in r.scan_iter(match=f"{queue(POOL, kind)}*"):  # and its priority lists
            if r.type(key) == b"list":
                held |= {json.loads(raw)["headers"]["id"] for raw in r.lrange(key, 0, -1)}
    return held


def seen(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_jobs_complete_exactly_once_while_the_worker_is_killed(tmp_path) -> None:
    rng = random.Random(20261204)
    marks = tmp_path / "marks"
    marks.mkdir()
    points: Counter[str] = Counter()
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
            # Only the worker pauses (the bridge passes some of the same points).
            kind_env={"worker": {"MIGCTL_FAULT_PAUSES": PAUSES, "MIGCTL_FAULT_MARKS": str(marks)}},
        ),
        workdir=tmp_path,
    ).start()
    try:
        store = RedisStore(stack.redis, POOL)
        wait_until(
            lambda: sum(vm.state.value == "READY" for vm, _ in store.get_vms()) >= 2,
            "two READY VMs",
            60,
        )
        ids: list[str] = []
        kills = rounds = 0
        while kills < KILLS and rounds < 4 * KILLS:
            rounds += 1
            ids += stack.submit(rng.randint(7, 13))
            # Kill while a worker task is inside one of its steps (a pause point marks it;
            # only the worker pauses), a random moment into it.
            if not seen(lambda: any(marks.iterdir()), 5):
                continue
            time.sleep(rng.uniform(0.0, 0.05))
            points.update(m.name.rsplit(".", 1)[0] for m in marks.iterdir())
            stack.stop_process("worker", signal.SIGKILL)
            kills += 1
            for leftover in marks.iterdir():  # the killed process never removed its mark
                leftover.unlink(missing_ok=True)
            time.sleep(rng.uniform(0.0, 0.5))
            if kills == KILLS:  # the rest of the run at full speed
                stack.o.kind_env.pop("worker")
            stack._spawn("worker", "worker")
        assert kills >= KILLS - 2, f"only {kills} kills landed mid-task"
        ids += stack.submit(JOBS - len(ids)) if len(ids) < JOBS else []
        started = time.monotonic()
        wait_all_terminal(stack, store, ids, 300)
        settled = time.monotonic() - started
        # The killed workers' unacked messages come back after the visibility timeout,
        # possibly after every job is terminal (the sweeps finish what they left): let
        # them run too, so the checks below see their effects.
        left = {json.loads(raw)[0]["headers"]["id"] for raw in stack.redis.hvals("unacked")}
        wait_until(lambda: not left & held_task_ids(stack.redis), "late redeliveries run", 120)
        counters = check_exactly_once(stack, ids)
        world = check_no_orphans(stack)
        # The kills did land inside tasks: some task ids were received again.
        log = stack.log_tail("worker", 10**6)
        received = re.findall(r"Task (migctl\.\w+\[[0-9a-f-]+\]) received", log)
        deliveries = Counter(received)
        redelivered = [t for t, n in deliveries.items() if n > 1]
        assert redelivered, "no task was redelivered: the kills missed every task"
        kinds = Counter(t.split("[")[0] for t in redelivered)
        print(
            f"{len(ids)} jobs, {kills} kill -9 of the worker inside {dict(points)}; "
            f"{len(redelivered)} tasks redelivered {dict(kinds)}, "
            f"{sum(deliveries[t] - 1 for t in redelivered)} times in all ({len(left)} tasks "
            f"were still unacked when all jobs were terminal); lost 0, doubled 0; requeued "
            f"{counters.get('requeued_jobs', 0)}; all terminal {settled:.1f}s after the "
            f"last submit; settled world {world}"
        )
    finally:
        stack.stop()
