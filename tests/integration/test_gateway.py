"""The gateway over real grpc.aio and a real Redis: the session registry, admission,
the relay in both directions, replay in order, and two replicas with a VM hopping.

Agents are `DeployedLikeAgent`s (the deployed agents' channel settings and behaviour);
the Celery side is a recording `send_task`, so no worker runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, InfraStatus
from migctl.domain.transitions import Change
from migctl.gateway.app import GatewayServer
from migctl.gateway.stats import stats_key
from migctl.gateway.testing import (
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

pytestmark = pytest.mark.integration

SETTINGS = settings_for("pool-a")


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, "pool-a")
    for vm_id in ("vm-1", "vm-2", "vm-3"):
        add_vm(store, vm_id)
    yield store
    client.close()


def target(app: GatewayServer) -> str:
    return f"127.0.0.1:{app.port}"


def vm(store: RedisStore, vm_id: str):  # type: ignore[no-untyped-def]
    got = store.get_vm(vm_id)
    assert got is not None, vm_id
    return got[0]


def test_connect_must_come_first(redis_url: str, store: RedisStore) -> None:
    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            async with grpc.aio.insecure_channel(target(app)) as channel:
                call = pb_grpc.CommandServiceStub(channel).StreamCommands()
                beat = pb.Heartbeat(vm_id="vm-1", miglet_state="ready")
                await call.write(pb.MIGletMessage(heartbeat=beat))
                first = await call.read()
                assert first.WhichOneof("message") == "error"
                assert "first message must be connect" in first.error.message
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await call.read()
                assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert len(app.gateway.sessions) == 0
            assert app.gateway.stats.refused["protocol"] == 1
        assert not vm(store, "vm-1").connected

    asyncio.run(scenario())
    assert_no_leaks()


@pytest.mark.parametrize(
    ("vm_id", "pool_id", "reason"),
    [("vm-9", "pool-a", "unknown VM 'vm-9'"), ("vm-1", "pool-b", "pool 'pool-b' is not served")],
    ids=["unknown-vm", "wrong-pool"],
)
def test_strangers_are_refused(
    redis_url: str, store: RedisStore, vm_id: str, pool_id: str, reason: str
) -> None:
    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            agent = DeployedLikeAgent(target(app), vm_id, pool_id)
            ack = await agent.connect()
            assert ack is not None and not ack.accepted
            assert reason in ack.message
            await until(lambda: agent.ended.is_set(), "the refused stream to end")
            assert agent.status == grpc.StatusCode.OK
            assert len(app.gateway.sessions) == 0
            assert sum(app.gateway.stats.refused.values()) == 1
            await agent.drop()

    asyncio.run(scenario())
    assert_no_leaks()


def test_a_reconnect_replaces_the_old_session(redis_url: str, store: RedisStore) -> None:
    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            gw = app.gateway
            first = DeployedLikeAgent(target(app), "vm-1")
            assert (await first.connect()).accepted  # type: ignore[union-attr]
            old = gw.sessions.get("vm-1")
            assert old is not None and vm(store, "vm-1").session == old.id
            second = DeployedLikeAgent(target(app), "vm-1")
            assert (await second.connect()).accepted  # type: ignore[union-attr]
            await until(lambda: first.ended.is_set(), "the old stream to be ended")
            assert first.status == grpc.StatusCode.ABORTED and "replaced" in first.details
            new = gw.sessions.get("vm-1")
            assert new is not None and new is not old and len(gw.sessions) == 1
            # The old stream's end must not mark the VM disconnected: it is the new one's.
            await asyncio.sleep(0.2)
            record = vm(store, "vm-1")
            assert record.connected and record.session == new.id
            assert gw.stats.replaced == 1
            # The new stream still works.
            cmd = await asyncio.to_thread(enqueue, store, "vm-1")
            await until(lambda: [c.id for c in second.commands] == [cmd], "the command")
            await second.close()
            assert second.status == grpc.StatusCode.OK
            await until(lambda: not vm(store, "vm-1").connected, "the disconnect recorded")
            assert len(gw.sessions) == 0
            await first.drop()

    asyncio.run(scenario())
    assert_no_leaks()


def test_a_stream_whose_connect_write_was_lost_is_recorded_again(
    redis_url: str, store: RedisStore
) -> None:
    # Redis lost the write that recorded the stream (a restart inside the AOF's second):
    # the agent's next state report over the stream re-records it, and the stream's end
    # is then recorded as its disconnect.
    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            agent = DeployedLikeAgent(target(app), "vm-3")
            await agent.connect()
            await until(lambda: vm(store, "vm-3").connected, "the connect recorded")
            session = vm(store, "vm-3").session
            got = store.get_vm("vm-3")
            assert got is not None
            lost = got[0].with_(connected=False, session="")
            store.save(Change(vms={"vm-3": lost}), {"vm:vm-3": got[1]})
            await agent.heartbeat("idle")
            await until(lambda: vm(store, "vm-3").agent is AgentState.IDLE, "the report")
            assert (vm(store, "vm-3").connected, vm(store, "vm-3").session) == (True, session)
            await agent.drop()
            await until(lambda: not vm(store, "vm-3").connected, "the disconnect recorded")

    asyncio.run(scenario())
    assert_no_leaks()


def test_a_vanished_agent_is_unregistered(redis_url: str, store: RedisStore) -> None:
    # The last listing still said CREATING: an agent talking proves the VM runs, so its
    # silence later counts for the health sweep even if the VM vanishes before a sync.
    got = store.get_vm("vm-2")
    assert got is not None
    store.save(Change(vms={"vm-2": got[0].with_(infra=InfraStatus.CREATING)}), {"vm:vm-2": got[1]})

    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            agent = DeployedLikeAgent(target(app), "vm-2")
            await agent.connect()
            await until(lambda: app.gateway.sessions.get("vm-2"), "the session")
            await until(lambda: vm(store, "vm-2").connected, "the connect recorded")
            assert vm(store, "vm-2").infra is InfraStatus.RUNNING
            await agent.drop()  # no half-close: the call is cancelled under the gateway
            await until(lambda: len(app.gateway.sessions) == 0, "the session removed")
            await until(lambda: not vm(store, "vm-2").connected, "the disconnect recorded")
            assert vm(store, "vm-2").session == ""

    asyncio.run(scenario())
    assert_no_leaks()


def test_relay_both_ways(redis_url: str, store: RedisStore) -> None:
    """Commands with ids in outbox order; acks recorded once and relayed once; events
    once each; heartbeats coalesced into the VM record; state changes applied."""
    send_task = RecordingSendTask()

    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url, send_task=send_task) as app:
            agent = DeployedLikeAgent(target(app), "vm-1", capabilities=["jit"])
            await agent.connect()
            await until(lambda: vm(store, "vm-1").agent is AgentState.READY, "ready recorded")
            assert vm(store, "vm-1").capabilities == ("jit",)
            ids = [await asyncio.to_thread(enqueue, store, "vm-1") for _ in range(5)]
            await until(lambda: len(send_task.of("migctl.command_acked")) == 5, "5 acks relayed")
            assert [c.id for c in agent.commands] == ids
            assert [a[1] for a in send_task.of("migctl.command_acked")] == ids
            assert store.pending_commands("vm-1") == []
            outcome = store.command_outcome(ids[0])
            assert outcome is not None and outcome["success"] and outcome["message"] == "ok"
            # A duplicate ack (an agent resending after a reconnect) is not relayed again,
            # and an ack for a command the VM was never sent records nothing.
            await agent.ack(ids[0], True, "ok")
            await agent.ack("no-such-command", True, "ok")
            # Events: each once, even when the agent resends one.
            await agent.event("job_started", timestamp=1_700_000_000, job_id="j1", run_id="r1")
            await agent.event("job_started", timestamp=1_700_000_000, job_id="j1", run_id="r1")
            await agent.event("made_up_event", reason="x")
            await agent.event("vm_started")
            await until(lambda: len(send_task.of("migctl.agent_event")) == 2, "2 events")
            await until(lambda: app.gateway.stats.events_duplicate == 1, "the resend seen")
            assert app.gateway.stats.acks_duplicate == 2
            assert len(send_task.of("migctl.command_acked")) == 5
            assert store.command_outcome("no-such-command") is None
            # The agent's own timestamp travels with the event (orders a late one).
            assert send_task.of("migctl.agent_event")[0][:3] == (
                "vm-1",
                "job_started",
                {"job_id": "j1", "run_id": "r1"},
            )
            assert send_task.of("migctl.agent_event")[0][3] > 0
            assert app.gateway.stats.events_dropped == 1
            # Heartbeats reach the record within a flush.
            before = vm(store, "vm-1").last_heartbeat
            await asyncio.sleep(0.01)
            await agent.heartbeat("ready")
            await until(lambda: vm(store, "vm-1").last_heartbeat > before, "heartbeat flushed")
            await agent.close()

    asyncio.run(scenario())
    assert_no_leaks()


def test_expired_commands_are_not_delivered(redis_url: str, store: RedisStore) -> None:
    async def scenario() -> None:
        expired = await asyncio.to_thread(
            enqueue, store, "vm-1", "register_runner", expires_at=time.time() - 1
        )
        live = await asyncio.to_thread(enqueue, store, "vm-1")
        async with running_gateway(SETTINGS, redis_url) as app:
            agent = DeployedLikeAgent(target(app), "vm-1")
            await agent.connect()
            await until(lambda: agent.commands, "the live command")
            later = await asyncio.to_thread(enqueue, store, "vm-1")
            await until(lambda: len(agent.commands) == 2, "the later command")
            assert [c.id for c in agent.commands] == [live, later]
            assert expired not in store.r.lrange(store.k.outbox("vm-1"), 0, -1)
            await agent.close()

    asyncio.run(scenario())
    assert_no_leaks()


def test_unacked_commands_are_replayed_in_order_on_reconnect(
    redis_url: str, store: RedisStore
) -> None:
    send_task = RecordingSendTask()

    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url, send_task=send_task) as app:
            silent = DeployedLikeAgent(target(app), "vm-1", auto_ack=False)
            await silent.connect()
            ids = [await asyncio.to_thread(enqueue, store, "vm-1") for _ in range(3)]
            await until(lambda: len(silent.commands) == 3, "3 commands delivered")
            await silent.drop()
            await until(lambda: not app.gateway.sessions.get("vm-1"), "the stream gone")
            ids.append(await asyncio.to_thread(enqueue, store, "vm-1"))  # while away
            again = DeployedLikeAgent(target(app), "vm-1")
            await again.connect()
            await until(lambda: len(send_task.of("migctl.command_acked")) == 4, "4 acks")
            assert [c.id for c in again.commands] == ids
            await again.close()

    asyncio.run(scenario())
    assert_no_leaks()


def test_two_replicas_and_a_vm_hopping(redis_url: str, store: RedisStore) -> None:
    """Any replica may hold any VM; wake-ups reach every replica; a VM moving between
    them gets every command once, and the replica it left cannot disconnect it."""
    tasks_a, tasks_b = RecordingSendTask(), RecordingSendTask()

    async def scenario() -> None:
        async with (
            running_gateway(SETTINGS, redis_url, send_task=tasks_a, gateway_id="ga") as a,
            running_gateway(SETTINGS, redis_url, send_task=tasks_b, gateway_id="gb") as b,
        ):
            on_a = DeployedLikeAgent(target(a), "vm-1")
            other = DeployedLikeAgent(target(b), "vm-2")
            await on_a.connect()
            await other.connect()
            c1 = await asyncio.to_thread(enqueue, store, "vm-1")
            c2 = await asyncio.to_thread(enqueue, store, "vm-2")
            await until(lambda: [c.id for c in on_a.commands] == [c1], "c1 via replica a")
            await until(lambda: [c.id for c in other.commands] == [c2], "c2 via replica b")
            # vm-1 hops to b while its stream on a is still open (a half-dead connection).
            hop = DeployedLikeAgent(target(b), "vm-1", auto_ack=False)
            await hop.connect()
            session_b = b.gateway.sessions.get("vm-1")
            assert session_b is not None and session_b.id.startswith("gb-")
            await until(lambda: vm(store, "vm-1").session == session_b.id, "b holds vm-1")
            # Replica a hears of it and ends its stale stream; that end must not mark
            # vm-1 disconnected, since b holds it.
            await until(lambda: on_a.ended.is_set(), "a to end its stale stream")
            assert on_a.status == grpc.StatusCode.ABORTED, on_a.details
            await until(lambda: not a.gateway.sessions.get("vm-1"), "a let go")
            c3 = await asyncio.to_thread(enqueue, store, "vm-1")
            await until(lambda: [c.id for c in hop.commands] == [c3], "c3 via replica b")
            await asyncio.sleep(0.2)
            record = vm(store, "vm-1")
            assert record.connected and record.session == session_b.id
            await hop.ack(c3, True, "ok")

            def acked() -> list[str]:
                return [a[1] for t in (tasks_a, tasks_b) for a in t.of("migctl.command_acked")]

            await until(lambda: len(acked()) == 3, "3 acks relayed")
            assert sorted(acked()) == sorted([c1, c2, c3])
            assert c3 in [a[1] for a in tasks_b.of("migctl.command_acked")]
            assert [c.id for c in on_a.commands] == [c1]  # c3 never went to the old stream
            # Both replicas are in the pool's stats; /stats sums the `gateways` hash.
            await asyncio.sleep(1.2)
            counts = store.r.hgetall(store.k.prefix + "gateways")
            assert counts == {b"ga": b"0", b"gb": b"2"}
            assert store.r.hget(stats_key(store, "gb"), "accepted") == b"2"
            await hop.close()
            await other.close()
        assert store.r.hgetall(store.k.prefix + "gateways") == {}

    asyncio.run(scenario())
    assert_no_leaks()


def test_a_taken_port_is_a_config_error(redis_url: str, store: RedisStore) -> None:
    from migctl.settings import ConfigError

    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url) as app:
            with pytest.raises(ConfigError, match="cannot listen"):
                async with running_gateway(SETTINGS, redis_url, port=app.port):
                    pass

    asyncio.run(scenario())
    assert_no_leaks()


def test_stats_count_refusals(redis_url: str, store: RedisStore) -> None:
    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url, gateway_id="gs") as app:
            for _ in range(2):
                agent = DeployedLikeAgent(target(app), "vm-404")
                await agent.connect()
                await agent.drop()
            await until(lambda: store.r.hget(stats_key(store, "gs"), "refused"), "stats")
            raw: dict[bytes, bytes] = store.r.hgetall(stats_key(store, "gs"))  # type: ignore[assignment]
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            assert fields["refused"] == "2" and fields["refused:unknown_vm"] == "2"
            assert json.loads(fields["sessions"]) == 0

    asyncio.run(scenario())
    assert_no_leaks()
