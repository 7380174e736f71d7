"""A client configured exactly like a deployed agent (10 s keepalive pings with and
without streams, 3 s ping timeout) goes through connect -> ready -> register_runner ->
ack -> events, then stays silent: it must not be disconnected.

Why 45 s of silence: under gRPC's default server policy the first ping after data is
free and each later one within 5 min is a strike; the third strike (the 4th ping, ~40 s
after the last message) brings GOAWAY `too_many_pings`. 45 s is the shortest window
that would catch that regression (checked by hand with the default policy: dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import redis
from grpc import aio

from migctl.adapters.redis_store import RedisStore
from migctl.gateway.testing import (
    DEPLOYED_OPTIONS,
    OWN_CONNECTION,
    DeployedLikeAgent,
    RecordingSendTask,
    add_vm,
    assert_no_leaks,
    enqueue,
    running_gateway,
    settings_for,
    until,
)
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SILENCE_S = 45.0


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, "pool-a")
    add_vm(store, "vm-1")
    add_vm(store, "vm-2")
    yield store
    client.close()


async def watch(channel: aio.Channel, seen: list[grpc.ChannelConnectivity]) -> None:
    """Record every connectivity change (a GOAWAY takes a channel out of READY)."""
    state = channel.get_state()
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state()
        seen.append(state)


def test_a_deployed_like_agent_left_silent_stays_connected(
    redis_url: str, store: RedisStore
) -> None:
    send_task = RecordingSendTask()

    async def scenario() -> None:
        async with running_gateway(settings_for("pool-a"), redis_url, send_task=send_task) as app:
            target = f"127.0.0.1:{app.port}"
            agent = DeployedLikeAgent(target, "vm-1")
            assert (await agent.connect()).accepted  # type: ignore[union-attr]
            session = app.gateway.sessions.get("vm-1")
            assert session is not None
            register = await asyncio.to_thread(
                enqueue,
                store,
                "vm-1",
                "register_runner",
                string_params={
                    "registration_token": "AABBCC",
                    "runner_url": "https://github.com/acme",
                    "runner_group": "default",
                    "runner_name": "vm-1",
                },
                string_array_params=["self-hosted", "linux", "x64"],
            )
            await until(lambda: send_task.of("migctl.command_acked"), "the registration ack")
            await until(lambda: send_task.of("migctl.agent_event"), "runner_registered")
            assert agent.registrations == [
                {
                    "registration_token": "AABBCC",
                    "runner_url": "https://github.com/acme",
                    "runner_group": "default",
                    "labels": ["self-hosted", "linux", "x64"],
                }
            ]
            assert send_task.of("migctl.command_acked")[0][1] == register

            # A second deployed-like channel with no stream open: pings without calls.
            idle = aio.insecure_channel(target, [*DEPLOYED_OPTIONS, *OWN_CONNECTION])
            probe = pb_grpc.CommandServiceStub(idle).StreamCommands()
            await probe.write(pb.MIGletMessage(connect=pb.ConnectRequest(vm_id="vm-2")))
            assert (await probe.read()).connect_ack.accepted
            await probe.done_writing()
            assert await probe.read() is aio.EOF
            assert idle.get_state() is grpc.ChannelConnectivity.READY

            changes: dict[str, list[grpc.ChannelConnectivity]] = {"agent": [], "idle": []}
            watchers = [
                asyncio.create_task(watch(agent._channel, changes["agent"])),
                asyncio.create_task(watch(idle, changes["idle"])),
            ]
            frames = app.gateway.stats.frames
            started = time.monotonic()
            await asyncio.sleep(SILENCE_S)  # an observation window, not a timing assertion
            for task in watchers:
                task.cancel()
            assert app.gateway.stats.frames == frames, "the agent was meant to stay silent"
            assert not agent.ended.is_set(), f"{agent.status}: {agent.details}"
            assert changes == {"agent": [], "idle": []}, changes
            assert app.gateway.sessions.get("vm-1") is session
            record = store.get_vm("vm-1")
            assert record is not None and record[0].connected and record[0].session == session.id

            # Still a working stream both ways after the silence.
            later = await asyncio.to_thread(enqueue, store, "vm-1")
            await until(lambda: agent.commands[-1].id == later, "a command after the silence")
            await agent.event("job_started", job_id="42", run_id="7")
            await until(lambda: len(send_task.of("migctl.agent_event")) == 2, "job_started")
            print(f"silent for {time.monotonic() - started:.0f}s, still connected")
            await agent.close()
            await idle.close()

    asyncio.run(scenario())
    assert_no_leaks()
