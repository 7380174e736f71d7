"""The tasks on a real Celery worker (celery.contrib's embedded one) and a real Redis:
routing by the pool's queues, the assignment path, and two pools on one Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker

from migctl import runtime as rt
from migctl.adapters.redis_store import RedisStore
from migctl.bridge.messages import JobEvent
from migctl.domain.model import AgentState, InfraStatus, JobState, Vm
from migctl.domain.transitions import Change
from migctl.ports import RunnerCredentials
from migctl.settings import Settings
from migctl.worker.app import build_app, reset_app
from migctl.worker.queues import KINDS, queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LABELS = ("self-hosted", "linux", "x64")


class FakeTokens:
    def __init__(self) -> None:
        self.calls = 0

    def runner_credentials(self, scope, runner_name, labels, jit):
        self.calls += 1
        return RunnerCredentials(
            runner_url=f"https://github.com/{scope.org}",
            registration_token="AAAA-test-registration-token",
            expires_at=time.time() + 3600,
        )


def settings_for(redis_url: str, pool: str) -> Settings:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    return Settings(
        pool={"id": pool, "labels": list(LABELS)},
        vm_manager={"provider": "sim"},
        github_app={"app_id": "1", "private_key": "unused", "org": "acme"},
        pubsub={"source": "local"},
        redis={"jobs": {"host": "127.0.0.1", "port": port}},
    )


@pytest.fixture
def pool(redis_url: str) -> Iterator[tuple[Settings, RedisStore, FakeTokens]]:
    settings = settings_for(redis_url, "pool-a")
    rt.use_settings(settings)
    app = build_app(settings)
    reset_app(app)
    runtime = rt.runtime()
    tokens = FakeTokens()
    runtime.__dict__["tokens"] = tokens  # our seam: no GitHub in this test
    with start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        queues=[queue("pool-a", k) for k in KINDS],
    ):
        yield settings, runtime.store, tokens
    reset_app(None)
    rt.use_settings(settings)


def ready_vm(store: RedisStore, vm_id: str) -> None:
    vm = Vm(
        id=vm_id,
        labels=LABELS,
        infra=InfraStatus.RUNNING,
        agent=AgentState.READY,
        connected=True,
        last_active=time.time(),
    )
    store.save(Change(vms={vm.id: vm}), {})


def wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def queued(job_id: str, pool: str = "pool-a") -> JobEvent:
    return JobEvent(
        "queued",
        job_id,
        "77",
        ("self-hosted", "linux"),
        "acme",
        "acme/app",
        1,
        pool,
        0,
        time.time(),
        "",
        "",
        "job_message",
    )


def test_a_queued_job_gets_a_register_runner_in_the_vm_outbox(pool) -> None:
    _, store, tokens = pool
    ready_vm(store, "vm-1")
    runtime = rt.runtime()
    assert runtime.intake.accept(queued("1001")).name == "CREATED"
    wait_for(lambda: store.get_job("1001")[0].state is JobState.ASSIGNED)
    job, _ = store.get_job("1001")
    assert job.vm_id == "vm-1"
    [command] = store.pending_commands("vm-1")
    assert command["type"] == "register_runner"
    params = command["string_params"]
    # What deployed agents read (PROTOCOL.md): registration_token, runner_url, labels.
    assert params["registration_token"] == "AAAA-test-registration-token"
    assert params["runner_url"] == "https://github.com/acme"
    assert command["string_array_params"] == list(LABELS)
    vm, _ = store.get_vm("vm-1")
    assert vm.reserved_job == "1001" and vm.cmd_id == command["id"]
    assert tokens.calls == 1


def test_no_free_vm_defers_and_the_ready_event_assigns(pool) -> None:
    _, store, _ = pool
    runtime = rt.runtime()
    runtime.intake.accept(queued("2002"))
    time.sleep(0.5)  # let the worker run assign_job: it must not wait for a VM
    assert store.get_job("2002")[0].state is JobState.QUEUED
    vm = Vm(
        id="vm-2",
        labels=LABELS,
        infra=InfraStatus.RUNNING,
        agent=AgentState.CONNECTING,
        connected=True,
    )
    store.save(Change(vms={vm.id: vm}), {})
    runtime.events.agent_state("vm-2", AgentState.READY)  # what the gateway does on the heartbeat
    wait_for(lambda: store.get_job("2002")[0].state is JobState.ASSIGNED)
    assert store.get_job("2002")[0].vm_id == "vm-2"


def test_a_task_for_another_pool_is_not_consumed(pool, redis_url: str) -> None:
    _, store, _ = pool
    other = settings_for(redis_url, "pool-b")
    other_store = RedisStore(store.r, "pool-b")
    ready_vm(other_store, "vm-b")
    other_store.create_job(Job_queued("3003", "pool-b"))
    app_b = build_app(other)
    app_b.send_task("migctl.assign_job", args=["3003"], queue=queue("pool-b", "assign"))
    time.sleep(1.0)
    assert other_store.get_job("3003")[0].state is JobState.QUEUED
    assert store.r.llen(queue("pool-b", "assign")) == 1  # still waiting for pool-b's worker
    reset_app(rt.runtime().dispatch.app)


def Job_queued(job_id: str, pool: str):
    from migctl.domain.model import Job

    return Job(id=job_id, labels=("self-hosted",), pool_id=pool, received_at=time.time())
