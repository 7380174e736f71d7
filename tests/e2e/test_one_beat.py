"""Two `celery -A migctl beat` at once: one schedule (redbeat's lock); when the active
one dies the standby takes over."""

from __future__ import annotations

import json
import signal
import time

import pytest

from migctl.sim.stack import LocalStack, StackOptions
from migctl.worker.queues import queue

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def sweep_origins(stack: LocalStack) -> list[str]:
    """The sender (`gen<pid>@host`) of every sweep task waiting in the reconcile queue."""
    out = []
    for raw in stack.redis.lrange(queue("pool-local", "reconcile"), 0, -1):
        message = json.loads(raw)
        headers = message["headers"]
        if headers.get("task") == "migctl.sweep":
            out.append(headers.get("origin", "?"))
    return out


def test_two_beats_make_one_schedule_and_the_standby_takes_over(tmp_path) -> None:
    stack = LocalStack(StackOptions(use_emulator=False, processes=()), workdir=tmp_path).start()
    try:
        stack._spawn("beat-a", "beat")
        stack._spawn("beat-b", "beat")
        pids = {stack.procs["beat-a"].pid: "beat-a", stack.procs["beat-b"].pid: "beat-b"}
        deadline = time.monotonic() + 60
        while len(sweep_origins(stack)) < 4:
            assert time.monotonic() < deadline, "no schedule at all"
            time.sleep(0.5)
        origins = set(sweep_origins(stack))
        assert len(origins) == 1, f"two beats both scheduling: {origins}"
        [origin] = origins
        active = next(name for pid, name in pids.items() if origin.startswith(f"gen{pid}@"))
        standby = "beat-b" if active == "beat-a" else "beat-a"
        stack.stop_process(active, signal.SIGKILL)
        killed_at = time.monotonic()
        standby_pid = stack.procs[standby].pid
        while not any(o.startswith(f"gen{standby_pid}@") for o in sweep_origins(stack)):
            assert time.monotonic() < killed_at + 90, "the standby never took over"
            time.sleep(0.2)
        print(f"standby took over {time.monotonic() - killed_at:.1f}s after the kill")
    finally:
        stack.stop()
