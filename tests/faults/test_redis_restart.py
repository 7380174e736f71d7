"""Restart Redis (its own redis-server, AOF everysec) five times during a run: every
process reconnects by itself, and a worker consumes tasks after each restart (Celery
workers are known to stop consuming after a Redis reconnect)."""

from __future__ import annotations

import time

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.settings import load_settings
from migctl.sim.pubsub_emulator import find_emulator
from migctl.sim.stack import POOL, LocalStack, RedisServer, StackOptions
from migctl.worker.app import build_app
from migctl.worker.queues import queue
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal
from tests.helpers import require

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

RESTARTS = 5


def test_jobs_survive_five_redis_restarts(tmp_path) -> None:
    require(find_emulator() is not None, "the Pub/Sub emulator")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    stack = LocalStack(
        StackOptions(
            redis_url=server.url,
            # Job events come through Pub/Sub, as in production: the bridge nacks while
            # Redis is down and the messages come back.
            use_emulator=True,
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=2,
            max_vms=8,
            job_duration=0.5,
            create_s=1.0,
            visibility_timeout=10.0,
            log_level="info",
            extra={"scheduler.assignment_timeout": "20s"},
        ),
        workdir=tmp_path,
    )
    try:
        stack.start()
        store = RedisStore(stack.redis, POOL)
        app = build_app(load_settings(stack.config_path))
        canary_key = store.k.prefix + "canary"
        ids: list[str] = []
        recoveries = []
        for _ in range(RESTARTS):
            ids += stack.submit(6)
            time.sleep(1.5)
            server.stop()
            time.sleep(0.5)
            server.start()
            restarted = time.time()
            # A worker must consume again: send a canary and wait for its mark.
            deadline = time.monotonic() + 60
            while True:
                try:
                    app.send_task("migctl.canary", queue=queue(POOL, "reconcile"))
                    value = stack.redis.get(canary_key)
                    if value and float(value) > restarted:
                        break
                except Exception:  # Redis still coming back: try again
                    pass
                assert time.monotonic() < deadline, (
                    "no worker consumed a task after the Redis restart"
                )
                time.sleep(0.5)
            recoveries.append(time.time() - restarted)
        ids += stack.submit(6)
        wait_all_terminal(stack, store, ids, 240)
        counters = check_exactly_once(stack, ids)
        check_no_orphans(stack)
        back = ", ".join(f"{r:.1f}s" for r in recoveries)
        requeued = counters.get("requeued_jobs", 0)
        print(f"{len(ids)} jobs, {RESTARTS} Redis restarts, consumer back after {back}")
        print(f"requeued {requeued}")
    finally:
        stack.stop()
        server.stop()
