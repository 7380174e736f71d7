"""`migctl-grpc-gateway` as a process: kill -9 and restart with commands queued, and a
graceful SIGTERM. The gateway hands agent messages to Celery (the real dispatcher);
no worker runs, so the tasks wait in the broker's queue list where the test reads them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.gateway.testing import DeployedLikeAgent, GatewayProcess, add_vm, enqueue, until

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
EVENTS_QUEUE = "migctl.pool-a.events"


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, "pool-a")
    for vm_id in ("vm-1", "vm-2", "vm-3"):
        add_vm(store, vm_id)
    yield store
    client.close()


@pytest.fixture
def gateways(tmp_path: Path, redis_url: str) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()


async def connect(target: str, vm_id: str, deadline: float = 30, **kw: Any) -> DeployedLikeAgent:
    """Connect as an agent does after a gateway restart: retry until accepted."""
    end = time.monotonic() + deadline
    while True:
        agent = DeployedLikeAgent(target, vm_id, **kw)
        ack = await agent.connect(timeout=5)
        if ack is not None and ack.accepted:
            return agent
        await agent.drop()
        if time.monotonic() > end:
            raise AssertionError(f"{vm_id} could not connect: {agent.status} {agent.details}")
        await asyncio.sleep(0.2)


def got_commands(agent: DeployedLikeAgent, n: int) -> Callable[[], bool]:
    return lambda: len(agent.commands) == n


def broker_tasks(store: RedisStore, name: str) -> list[list[Any]]:
    """Args of the Celery tasks `name` waiting in the events queue (kombu's Redis list)."""
    out = []
    for raw in store.r.lrange(EVENTS_QUEUE, 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == name:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            out.append(args)
    return out


def test_kill_and_restart_with_commands_queued(
    tmp_path: Path, redis_url: str, store: RedisStore, gateways: list[GatewayProcess]
) -> None:
    vms = ["vm-1", "vm-2", "vm-3"]

    async def scenario() -> None:
        first = GatewayProcess(tmp_path, redis_url).start()
        gateways.append(first)
        agents = {vm: await connect(first.target, vm, auto_ack=False) for vm in vms}
        queued = {vm: [await asyncio.to_thread(enqueue, store, vm)] for vm in vms}
        for vm, agent in agents.items():
            await until(got_commands(agent, 1), f"{vm}: first command")
        first.signal(signal.SIGKILL)  # delivered, not acked: must come again
        first.wait()
        for vm, agent in agents.items():
            await until(agent.ended.is_set, f"{vm}: stream cut")
            await agent.drop()
        for vm in vms:  # queued while no gateway runs
            queued[vm] += [await asyncio.to_thread(enqueue, store, vm) for _ in range(2)]

        second = GatewayProcess(tmp_path, redis_url, port=first.port, http_port=first.http_port)
        gateways.append(second.start())
        again = {vm: await connect(second.target, vm) for vm in vms}
        want = sum(len(ids) for ids in queued.values())
        await until(
            lambda: len(broker_tasks(store, "migctl.command_acked")) == want,
            f"{want} acks in the broker queue",
            timeout=30,
        )
        for vm, agent in again.items():
            assert [c.id for c in agent.commands] == queued[vm], vm  # in order, once each
            assert store.pending_commands(vm) == []
            for cmd_id in queued[vm]:
                assert store.command_outcome(cmd_id) is not None
        acked = sorted(args[1] for args in broker_tasks(store, "migctl.command_acked"))
        assert acked == sorted(i for ids in queued.values() for i in ids)  # once each
        # The killed gateway never recorded its disconnects; the new sessions own the VMs.
        for vm in vms:
            record = store.get_vm(vm)
            assert record is not None and record[0].connected
        # A re-sent ack (an agent unsure it got through) is not relayed again.
        await again["vm-1"].ack(queued["vm-1"][0], True, "ok")
        await again["vm-1"].event("vm_started")
        await until(lambda: broker_tasks(store, "migctl.agent_event"), "the event")
        assert len(broker_tasks(store, "migctl.command_acked")) == want
        for agent in again.values():
            await agent.close()

    try:
        asyncio.run(scenario())
    except BaseException:
        print("\n".join(gw.tail() for gw in gateways))
        raise


def test_sigterm_ends_streams_flushes_and_exits(
    tmp_path: Path, redis_url: str, store: RedisStore, gateways: list[GatewayProcess]
) -> None:
    async def scenario() -> None:
        gw = GatewayProcess(tmp_path, redis_url).start()
        gateways.append(gw)
        agents = [await connect(gw.target, vm) for vm in ("vm-1", "vm-2")]
        await until(
            lambda: store.r.hvals(store.k.prefix + "gateways") == [b"2"], "2 streams published"
        )
        before = store.get_vm("vm-1")[0].last_heartbeat
        await asyncio.sleep(0.01)
        # A state change is applied at once; the beat's time waits for a flush, which
        # the shutdown must not skip.
        await agents[0].heartbeat("idle")
        await until(lambda: store.get_vm("vm-1")[0].agent.value == "idle", "idle applied")
        gw.signal(signal.SIGTERM)
        for agent in agents:
            await until(agent.ended.is_set, "the stream ended by the gateway")
            assert agent.status == grpc.StatusCode.UNAVAILABLE, agent.details
            assert "shutting down" in agent.details
        assert await asyncio.to_thread(gw.wait, 30) == 0, gw.tail()
        for vm in ("vm-1", "vm-2"):
            record = store.get_vm(vm)
            assert record is not None and not record[0].connected, vm
        assert store.get_vm("vm-1")[0].last_heartbeat > before
        assert store.r.hgetall(store.k.prefix + "gateways") == {}
        late = DeployedLikeAgent(gw.target, "vm-3")
        assert await late.connect(timeout=5) is None
        assert late.status == grpc.StatusCode.UNAVAILABLE
        for agent in [*agents, late]:
            await agent.drop()

    try:
        asyncio.run(scenario())
    except BaseException:
        print("\n".join(gw.tail() for gw in gateways))
        raise
