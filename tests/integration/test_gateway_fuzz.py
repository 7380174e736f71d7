"""5,000 fuzzed frames at the gateway over raw generic stream calls (bytes in, bytes
out): random bytes, mutated messages, unknown oneof members, huge maps, oversized
frames, messages before connect, junk connects. The gateway must stay up, and a
well-behaved agent on it must not notice.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
import redis
from grpc import aio

from migctl.adapters.redis_store import RedisStore
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
from migctl.gateway.transport import METHOD
from migctl.wire.miglet import commands_pb2 as pb

pytestmark = pytest.mark.integration

FRAMES = 5_000
WORKERS = 32
FUZZ_VMS = [f"vm-fuzz-{i}" for i in range(WORKERS)]  # one each, so streams are not replaced
MAX_MESSAGE = 256 * 1024
SETTINGS = settings_for("pool-a", max_message_bytes=MAX_MESSAGE)
STATES = ["ready", "idle", "job_running", "draining", "updating", "", "\x00\xff"]
EVENTS = ["job_started", "job_completed", "runner_crashed", "vm_started", "made_up", ""]


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, "pool-a")
    for vm_id in ("vm-1", "vm-2", *FUZZ_VMS):
        add_vm(store, vm_id)
    yield store
    client.close()


def text(rng: random.Random, n: int = 12) -> str:
    return "".join(
        chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x2FFF)])) for _ in range(n)
    )


def connect(vm_id: str) -> bytes:
    hello = pb.ConnectRequest(vm_id=vm_id, pool_id="pool-a", version="fuzz", capabilities=["jit"])
    return pb.MIGletMessage(connect=hello).SerializeToString()


def valid(rng: random.Random) -> pb.MIGletMessage:
    kind = rng.choice(["heartbeat", "event", "ack", "error", "connect"])
    if kind == "heartbeat":
        beat = pb.Heartbeat(vm_id=text(rng), miglet_state=rng.choice(STATES))
        beat.runner_state.labels.extend(text(rng) for _ in range(rng.randint(0, 5)))
        return pb.MIGletMessage(heartbeat=beat)
    if kind == "event":
        data = {text(rng, 5): text(rng) for _ in range(rng.randint(0, 5))}
        ev = pb.EventNotification(
            type=rng.choice(EVENTS), data=data, timestamp=rng.randint(0, 2**40)
        )
        return pb.MIGletMessage(event=ev)
    if kind == "ack":
        ack = pb.CommandAck(command_id=text(rng, rng.randint(0, 200)), success=rng.random() < 0.5)
        return pb.MIGletMessage(command_ack=ack)
    if kind == "error":
        return pb.MIGletMessage(error=pb.ErrorNotification(code=text(rng), message=text(rng)))
    return pb.MIGletMessage(connect=pb.ConnectRequest(vm_id=text(rng)))


def huge_map(rng: random.Random, n: int) -> bytes:
    ev = pb.EventNotification(type="job_started", data={f"k{i}": "v" * 10 for i in range(n)})
    return pb.MIGletMessage(event=ev).SerializeToString()


def unknown_oneof(rng: random.Random) -> bytes:
    field = rng.choice([6, 17, 99, 1000])
    payload = rng.randbytes(rng.randint(0, 40))
    tag = field << 3 | 2  # length-delimited
    return _varint(tag) + _varint(len(payload)) + payload


def mutated(rng: random.Random) -> bytes:
    data = bytearray(valid(rng).SerializeToString() or b"\x00")
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def parses(frame: bytes) -> bool:
    try:
        pb.MIGletMessage.FromString(frame)
        return True
    except Exception:
        return False


def survivable(rng: random.Random) -> bytes:
    """A frame that decodes: meaningless, unknown or huge, but a MIGletMessage."""
    while True:
        choice = rng.random()
        if choice < 0.3:
            frame = mutated(rng)
        elif choice < 0.45:
            frame = unknown_oneof(rng)
        elif choice < 0.48:
            frame = huge_map(rng, 2_000)
        else:
            frame = valid(rng).SerializeToString()
        if parses(frame):
            return frame


def terminal(rng: random.Random) -> bytes:
    """A frame that ends its stream: not a MIGletMessage, or past the size limit."""
    if rng.random() < 0.1:
        return huge_map(rng, 20_000)
    while True:
        frame = rng.randbytes(rng.randint(1, 64)) if rng.random() < 0.5 else mutated(rng)
        if not parses(frame):
            return frame


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def stream_plan(rng: random.Random, vm_id: str) -> list[bytes]:
    """The frames of one fuzz stream."""
    roll = rng.random()
    if roll < 0.2:  # garbage before connect
        return [terminal(rng)]
    if roll < 0.35:  # a real message, but not connect, first
        return [valid(rng).SerializeToString(), survivable(rng)]
    if roll < 0.45:  # a junk connect
        return [connect(text(rng, rng.randint(0, 80))), survivable(rng)]
    frames = [connect(vm_id)] + [survivable(rng) for _ in range(rng.randint(1, 40))]
    return frames + ([terminal(rng)] if rng.random() < 0.5 else [])


async def fuzz_stream(channel: aio.Channel, frames: list[bytes]) -> None:
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)()
    try:
        for frame in frames:
            await call.write(frame)
        await call.done_writing()
        while await asyncio.wait_for(call.read(), 5) is not aio.EOF:
            pass
    except (aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError, TimeoutError):
        pass
    finally:
        call.cancel()


def test_fuzzed_frames_leave_the_gateway_and_a_good_agent_unaffected(
    redis_url: str, store: RedisStore
) -> None:
    rng = random.Random(20240607)
    send_task = RecordingSendTask()

    async def scenario() -> None:
        async with running_gateway(SETTINGS, redis_url, send_task=send_task) as app:
            gw = app.gateway
            target = f"127.0.0.1:{app.port}"
            good = DeployedLikeAgent(target, "vm-1")
            assert (await good.connect()).accepted  # type: ignore[union-attr]
            session = gw.sessions.get("vm-1")
            assert session is not None
            plans: list[list[list[bytes]]] = [[] for _ in range(WORKERS)]
            while sum(len(p) for worker in plans for p in worker) < FRAMES:
                i = rng.randrange(WORKERS)
                plans[i].append(stream_plan(rng, FUZZ_VMS[i]))

            async def worker(channel: aio.Channel, streams: list[list[bytes]]) -> None:
                for frames in streams:
                    await fuzz_stream(channel, frames)

            channels = [aio.insecure_channel(target) for _ in range(4)]
            await asyncio.gather(*(worker(channels[i % 4], plans[i]) for i in range(WORKERS)))
            for channel in channels:
                await channel.close()

            # The gateway is up and serves a newcomer.
            newcomer = DeployedLikeAgent(target, "vm-2")
            assert (await newcomer.connect()).accepted  # type: ignore[union-attr]
            # The good agent kept its stream and its session, and still works both ways.
            assert not good.ended.is_set(), good.details
            assert gw.sessions.get("vm-1") is session
            cmd = await asyncio.to_thread(enqueue, store, "vm-1")
            await until(lambda: [c.id for c in good.commands] == [cmd], "the good agent's command")
            await until(lambda: send_task.of("migctl.command_acked"), "its ack relayed")
            assert send_task.of("migctl.command_acked") == [(("vm-1", cmd, True, "ok"))]
            await good.event("job_started", job_id="j-good", run_id="r-good")
            good_event = ("vm-1", "job_started", {"job_id": "j-good", "run_id": "r-good"})
            await until(
                lambda: any(e[:3] == good_event for e in send_task.of("migctl.agent_event")),
                "its event",
            )
            record = store.get_vm("vm-1")
            assert record is not None and record[0].connected
            assert record[0].session == session.id
            # Junk acks wrote nothing; the fuzz was seen and counted.
            assert store.r.keys(store.k.prefix + "ack:*") == [store.k.ack(cmd).encode()]
            assert gw.stats.malformed > 100
            assert gw.stats.refused["protocol"] > 100
            await newcomer.close()
            await good.close()
        print(
            f"{sum(len(p) for w in plans for p in w)} frames in "
            f"{sum(map(len, plans))} streams, "
            f"{gw.stats.frames} read by the gateway; "
            f"malformed={gw.stats.malformed} refused={dict(gw.stats.refused)} "
            f"ignored={gw.stats.ignored} events={gw.stats.events} "
            f"dropped={gw.stats.events_dropped}"
        )

    asyncio.run(scenario())
    assert_no_leaks()
