"""The fleet boots an agent on each RUNNING SimMig VM and kills it when the VM goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from grpc import aio

from migctl.sim.fleet import Fleet
from migctl.sim.mig import SimMig, SimTimings
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/12"
T = SimTimings(create_s=3, start_s=2, resume_s=1, stop_s=1, suspend_s=1, delete_s=1)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Gateway(commands_pb2_grpc.CommandServiceServicer):
    """Accepts every agent; counts streams opened and closed per VM."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.capabilities: dict[str, list[str]] = {}

    async def StreamCommands(self, request_iterator: Any, context: Any) -> None:
        hello = (await context.read()).connect
        self.opened[hello.vm_id] += 1
        self.capabilities[hello.vm_id] = list(hello.capabilities)
        await context.write(pb.ControllerMessage(connect_ack=pb.ConnectAck(accepted=True)))
        try:
            while await context.read() is not aio.EOF:
                pass
        finally:
            self.closed[hello.vm_id] += 1

    def live(self) -> set[str]:
        return {vm for vm in self.opened if self.opened[vm] > self.closed[vm]}


class NoJobs:
    """A GitHub that never hands a job (these tests only boot and kill VMs)."""

    def register(self, *args: Any, **kwargs: Any) -> int:
        return 1

    def next_job(self, runner_id: int, wait: float) -> None:
        return None

    def complete(self, *args: Any) -> None: ...

    def renew(self, *args: Any) -> None: ...

    def remove(self, runner_id: int) -> None: ...


async def until(pred: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Wait for a condition (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def serve(gateway: Gateway) -> AsyncIterator[int]:
    server = aio.server()
    commands_pb2_grpc.add_CommandServiceServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


@pytest.fixture
def r() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("no Redis at 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-fleet")
    yield pool
    pool.shutdown(wait=True)


def test_fleet_follows_the_mig(r: redis.Redis, executor: ThreadPoolExecutor) -> None:
    clock = Clock()
    mig = SimMig(r, "pool-a", T, clock)

    async def scenario() -> None:
        gateway = Gateway()
        async with serve(gateway) as port:
            fleet = Fleet(
                mig,
                "pool-a",
                "acme",
                f"127.0.0.1:{port}",
                "http://github.invalid",
                heartbeat_interval=0.5,
                poll_interval=0.05,
                capabilities=["jit"],
                runner_client_factory=lambda url: NoJobs(),
                executor=executor,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(fleet.run(stop))

            mig.create(["vm-1", "vm-2"])
            clock.now += T.create_s
            mig.create(["vm-3"])  # still CREATING while the others run
            await until(lambda: gateway.live() == {"vm-1", "vm-2"})
            assert set(fleet.agents) == {"vm-1", "vm-2"}
            assert gateway.capabilities["vm-1"] == ["jit"]

            mig.stop(["vm-1"])  # STOPPING: the VM is going away
            await until(lambda: gateway.closed["vm-1"] == 1)
            assert set(fleet.agents) == {"vm-2"}

            mig.vanish("vm-2")
            await until(lambda: gateway.closed["vm-2"] == 1)
            assert fleet.agents == {}

            clock.now += T.stop_s
            mig.start(["vm-1"])
            clock.now += T.start_s  # vm-1 boots again, vm-3 finished creating
            await until(lambda: gateway.live() == {"vm-1", "vm-3"})
            assert gateway.opened["vm-1"] == 2  # a fresh agent: the VM rebooted

            stop.set()
            await asyncio.wait_for(task, 10)
            await until(lambda: gateway.live() == set())
            assert fleet.agents == {}

    asyncio.run(scenario())


def test_fleet_runs_as_a_process(r: redis.Redis) -> None:
    mig = SimMig(r, "pool-p", SimTimings(create_s=0))  # real clock: the process reads it too
    mig.create(["vm-p"])

    async def scenario() -> None:
        gateway = Gateway()
        async with serve(gateway) as port:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "migctl.sim.fleet",
                "--redis",
                REDIS_URL,
                "--pool",
                "pool-p",
                "--org",
                "acme",
                "--gateway",
                f"127.0.0.1:{port}",
                "--github",
                "http://github.invalid",
                "--poll",
                "0.1",
                "--log-level",
                "WARNING",
            )
            try:
                await until(lambda: gateway.live() == {"vm-p"}, timeout=30)
            finally:
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), 15)
            assert code == 0
            await until(lambda: gateway.live() == set())

    asyncio.run(scenario())
