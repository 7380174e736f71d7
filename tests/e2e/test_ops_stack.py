"""The operator's view of a running local world: the Procfile's processes (bridge,
worker, beat, gateway) as subprocesses, simulated agents over real gRPC. Jobs run; then
the HTTP endpoints, /metrics, the admin API's drain and cancel, and `migctl explain`
are checked against what happened."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState
from migctl.sim.stack import POOL, LocalStack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "e2e-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    s = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=1,
            max_vms=4,
            job_duration=0.5,
            create_s=0.5,
            heartbeat_interval=1.0,
            log_level="info",
            extra={"server.admin_token": TOKEN, "vm_manager.drain_timeout": "20s"},
        )
    )
    s.start()
    yield s
    s.stop()


def wait_for(stack: LocalStack, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in dead)
            pytest.fail(f"process(es) died while waiting for {what}: {dead}\n{logs}")
        try:
            if result := check():
                return result
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{stack.log_tail('gateway')}")
        time.sleep(0.3)


def base(stack: LocalStack) -> str:
    return f"http://127.0.0.1:{stack.ports['http']}"


def migctl(stack: LocalStack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migctl.cli", *argv, "--config", str(stack.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_operator_view_of_a_running_pool(stack: LocalStack) -> None:
    store = RedisStore(stack.redis, POOL)
    ids = stack.submit(3)

    def finished() -> bool:
        jobs = store.get_jobs(ids)
        return len(jobs) == 3 and all(job.state is JobState.COMPLETED for job, _ in jobs)

    wait_for(stack, "3 jobs to complete", finished, 120)
    url = base(stack)

    # /ready turns 200 once beat's canary has been consumed by the worker.
    ready = wait_for(
        stack, "/ready", lambda: requests.get(f"{url}/ready", timeout=5).status_code == 200, 60
    )
    assert ready
    stats = requests.get(f"{url}/stats", timeout=5).json()
    assert stats["pool_id"] == POOL and stats["queue_length"] == 0
    assert stats["assigned_jobs"] >= 3 and stats["connected_vms"] >= 1

    def scraped() -> dict[str, Any] | None:
        text = requests.get(f"{url}/metrics", timeout=5).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        waits = families["controller_job_wait_seconds"]
        count = next(s.value for s in waits.samples if s.name.endswith("_count"))
        return families if count >= 3 else None

    families = wait_for(stack, "three waits in the histogram", scraped, 30)
    assert families["queue_length"].samples[0].value == 0
    assert families["assigned_jobs"].samples[0].value >= 3
    assert families["controller_redis_up"].samples[0].value == 1

    story = requests.get(f"{url}/api/v1/jobs/{ids[0]}", timeout=5).json()
    hops = [hop["hop"] for hop in story["timeline"]]
    for hop in ("received", "queued", "decided", "started", "completed"):
        assert hop in hops, hops
    assert hops[-1] == "completed"
    assert story["job"]["wait_s"] > 0 and story["job"]["vm_id"]

    explained = migctl(stack, "explain", ids[0])
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith(f"job {ids[0]}  COMPLETED")
    assert "waiting for:   nothing: the job is COMPLETED (success)" in explained.stdout
    status = migctl(stack, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pool_id"] == POOL

    page = requests.get(f"{url}/", timeout=5)
    assert page.status_code == 200 and "status.js" in page.text


def test_cancel_a_running_job_then_drain_its_vm(stack: LocalStack) -> None:
    store = RedisStore(stack.redis, POOL)
    url = base(stack)
    [job_id] = stack.submit(1, duration=6.0)

    def running() -> str:
        got = store.get_job(job_id)
        return got[0].vm_id if got and got[0].state is JobState.RUNNING else ""

    vm_id = wait_for(stack, "the long job to run", running, 60)
    refused = requests.post(f"{url}/api/v1/jobs/{job_id}/cancel", timeout=5)
    assert refused.status_code == 401
    cancelled = requests.post(
        f"{url}/api/v1/jobs/{job_id}/cancel", headers=AUTH, json={"reason": "e2e"}, timeout=5
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["job"]["state"] == "CANCELLED"

    busy = requests.post(f"{url}/api/v1/vms/{vm_id}/drain", headers=AUTH, timeout=5)
    assert busy.status_code == 409 and "BUSY" in busy.json()["error"]

    def free() -> bool:
        vm = requests.get(f"{url}/api/v1/vms/{vm_id}", timeout=5).json()["vm"]
        return bool(vm["free"])

    wait_for(stack, f"{vm_id} to be free after the runner finished", free, 60)
    got = store.get_job(job_id)
    assert (
        got is not None and got[0].state is JobState.CANCELLED
    )  # the late completion changed nothing

    drained = requests.post(f"{url}/api/v1/vms/{vm_id}/drain", headers=AUTH, timeout=5)
    if drained.status_code == 409:  # the warm pool handed it a job meanwhile: fine, retry once
        wait_for(stack, f"{vm_id} free again", free, 60)
        drained = requests.post(f"{url}/api/v1/vms/{vm_id}/drain", headers=AUTH, timeout=5)
    assert drained.status_code == 202, drained.text

    def agent_drained() -> bool:
        vm = requests.get(f"{url}/api/v1/vms/{vm_id}", timeout=5).json()
        return not vm["pending_commands"] and not vm["vm"]["registration_pending"]

    wait_for(stack, f"the agent on {vm_id} to ack the drain", agent_drained, 30)
    explained = migctl(stack, "explain", job_id)
    assert "reason:        cancelled by an operator: e2e" in explained.stdout
