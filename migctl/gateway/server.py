"""The MIGlet gateway: one grpc.aio stream per VM, commands relayed from Redis, agent
messages relayed to workers.

Delivery is outbox-first: a worker writes the command to the VM's outbox in Redis and
publishes a wake-up; the gateway holding the VM's stream reads the outbox and sends what
this stream has not sent yet. On (re)connect the whole outbox is replayed, so a lost
wake-up (Redis pub/sub is at-most-once) or a VM moving to another replica loses nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis

from migctl import __version__
from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, Lifecycle
from migctl.services.events import AgentEvents
from migctl.settings import Settings
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_S = 1.0

# Deployed agents ping every 10 s, with and without calls (PROTOCOL.md). gRPC's default
# server policy (one ping per 5 min without data, 2 strikes) would GOAWAY them with
# too_many_pings; 5 s leaves room for timer jitter. The server pings too, to find dead VMs.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # A burst of thousands of reconnecting agents must queue, not be refused (FACTS F.1).
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    size = settings.server.max_message_bytes
    return [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
    ]


@dataclass
class Session:
    vm_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outbound: asyncio.Queue[pb.ControllerMessage | None] = field(default_factory=asyncio.Queue)
    sent: set[str] = field(default_factory=set)
    state: str = ""
    delivering: bool = False
    again: bool = False

    def close(self) -> None:
        self.outbound.put_nowait(None)


class Relay:
    """What the gateway does with Redis and the workers, off the event loop."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        events: AgentEvents,
        send_task: Callable[..., None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.send_task = send_task
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="relay")

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)


class Gateway(pb_grpc.CommandServiceServicer):
    def __init__(self, settings: Settings, relay: Relay, redis_url: str) -> None:
        self.settings = settings
        self.relay = relay
        self.store = relay.store
        self.redis_url = redis_url
        self.sessions: dict[str, Session] = {}
        self.beats: dict[str, float] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.refused = 0
        self._inflight: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start_background(self) -> None:
        self._tasks = [
            asyncio.create_task(self._wakeups()),
            asyncio.create_task(self._flush_heartbeats()),
        ]

    async def stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        for session in list(self.sessions.values()):
            session.close()

    # -- the stream ----------------------------------------------------------------------

    async def StreamCommands(
        self, request_iterator: AsyncIterator[pb.MIGletMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ControllerMessage]:
        first = await _next(request_iterator)
        if first is None or first.WhichOneof("message") != "connect":
            self.refused += 1
            yield _error("protocol", "the first message must be connect")
            return
        hello = first.connect
        verdict = await self._admit(hello, context)
        if verdict:
            self.refused += 1
            log.warning("refused agent vm=%r pool=%r: %s", hello.vm_id, hello.pool_id, verdict)
            yield pb.ControllerMessage(
                connect_ack=pb.ConnectAck(
                    accepted=False, message=verdict, server_version=__version__
                )
            )
            return
        session = Session(hello.vm_id)
        old = self.sessions.get(hello.vm_id)
        self.sessions[hello.vm_id] = session
        if old is not None:
            old.close()  # a reconnecting VM replaces its old stream
        reader = None
        try:
            await self.relay.run(self._connected, session, tuple(hello.capabilities))
            yield pb.ControllerMessage(
                connect_ack=pb.ConnectAck(
                    accepted=True, message="welcome", server_version=__version__
                )
            )
            reader = asyncio.create_task(self._read(session, request_iterator))
            await self._deliver(session)
            while True:
                msg = await session.outbound.get()
                if msg is None:
                    break
                yield msg
        finally:
            if reader is not None:
                reader.cancel()
            if self.sessions.get(session.vm_id) is session:
                del self.sessions[session.vm_id]
            self.beats.pop(session.vm_id, None)
            try:
                await self.relay.run(self.relay.events.disconnected, session.vm_id, session.id)
            except Exception:  # Redis down: the heartbeat sweep will notice the silence
                log.exception("could not record the disconnect of %s", session.vm_id)

    async def _admit(self, hello: pb.ConnectRequest, context: grpc.aio.ServicerContext) -> str:
        server = self.settings.server
        if server.auth_mode == "token":
            metadata = dict(context.invocation_metadata() or ())
            given = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), server.agent_token.encode()):
                return "unauthenticated: a valid bearer token is required"
        if not hello.vm_id:
            return "connect without vm_id"
        if hello.pool_id and hello.pool_id != self.settings.pool.id:
            return f"pool {hello.pool_id!r} is not served here ({self.settings.pool.id!r})"
        known = await self.relay.run(self.store.get_vm, hello.vm_id)
        if known is None:
            return f"unknown VM {hello.vm_id!r}: not a member of pool {self.settings.pool.id!r}"
        return ""

    def _connected(self, session: Session, capabilities: tuple[str, ...]) -> None:
        events = self.relay.events

        def update(vm: Any) -> Any:
            agent = vm.agent if vm.agent is not AgentState.NONE else AgentState.CONNECTING
            lifecycle = Lifecycle.NONE if vm.lifecycle is Lifecycle.STARTING else vm.lifecycle
            return vm.with_(
                connected=True,
                session=session.id,
                capabilities=capabilities,
                agent=agent,
                lifecycle=lifecycle,
                last_heartbeat=time.time(),
                unhealthy=False,
            )

        events._update_vm(session.vm_id, update)

    async def _read(
        self, session: Session, request_iterator: AsyncIterator[pb.MIGletMessage]
    ) -> None:
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("message")
                if kind == "heartbeat":
                    await self._heartbeat(session, msg.heartbeat)
                elif kind == "event":
                    ev = msg.event
                    await self.relay.run(
                        self.relay.send_task,
                        "migctl.agent_event",
                        session.vm_id,
                        ev.type,
                        dict(ev.data),
                    )
                elif kind == "command_ack":
                    await self._ack(session, msg.command_ack)
                elif kind == "error":
                    log.warning(
                        "agent %s reports %s: %s", session.vm_id, msg.error.code, msg.error.message
                    )
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except Exception:
            log.exception("stream of %s failed", session.vm_id)
        finally:
            session.close()

    async def _heartbeat(self, session: Session, beat: pb.Heartbeat) -> None:
        self.beats[session.vm_id] = time.time()
        state = beat.miglet_state
        if state and state != session.state:
            session.state = state
            await self.relay.run(
                self.relay.events.agent_state, session.vm_id, AgentState.parse(state)
            )

    async def _ack(self, session: Session, ack: pb.CommandAck) -> None:
        outcome = {
            "success": ack.success,
            "message": ack.message,
            "result": dict(ack.result),
            "at": time.time(),
        }
        first = await self.relay.run(self.store.ack_command, session.vm_id, ack.command_id, outcome)
        if first:
            await self.relay.run(
                self.relay.send_task,
                "migctl.command_acked",
                session.vm_id,
                ack.command_id,
                ack.success,
                ack.message,
            )

    async def _deliver(self, session: Session) -> None:
        """Send this stream whatever the outbox holds that it has not sent yet."""
        if session.delivering:
            session.again = True
            return
        session.delivering = True
        try:
            while True:
                session.again = False
                pending = await self.relay.run(self.store.pending_commands, session.vm_id)
                for command in pending:
                    if command["id"] not in session.sent:
                        session.sent.add(command["id"])
                        session.outbound.put_nowait(pb.ControllerMessage(command=_command(command)))
                if not session.again:
                    return
        finally:
            session.delivering = False

    # -- background ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _wakeups(self) -> None:
        """One pub/sub connection per gateway, whatever the number of VMs."""
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.store.k.wake)
                backoff = 0.5
                # A wake-up missed while disconnected: sweep every session's outbox.
                for session in list(self.sessions.values()):
                    self._spawn(self._deliver(session))
                async for message in pubsub.listen():
                    vm_id = (
                        message["data"].decode()
                        if isinstance(message["data"], bytes)
                        else str(message["data"])
                    )
                    holder = self.sessions.get(vm_id)
                    if holder is not None:
                        self._spawn(self._deliver(holder))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wake-up subscription lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                await client.aclose()

    async def _flush_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_FLUSH_S)
            beats, self.beats = self.beats, {}
            if beats:
                try:
                    await self.relay.run(self.store.touch_heartbeats, beats)
                except Exception as exc:
                    log.warning("heartbeat flush failed: %s", exc)
            try:
                await self.relay.run(self._report_connected)
            except Exception:
                pass

    def _report_connected(self) -> None:
        self.store.r.hset(self.store.k.prefix + "gateways", gateway_id(), len(self.sessions))
        self.store.r.hset(self.store.k.prefix + "gateways:seen", gateway_id(), repr(time.time()))


_GATEWAY_ID = f"{uuid.uuid4().hex[:8]}"


def gateway_id() -> str:
    return _GATEWAY_ID


async def _next(iterator: AsyncIterator[pb.MIGletMessage]) -> pb.MIGletMessage | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


def _error(code: str, message: str) -> pb.ControllerMessage:
    return pb.ControllerMessage(
        error=pb.ErrorNotification(code=code, message=message, timestamp=int(time.time()))
    )


def _command(command: dict[str, Any]) -> pb.Command:
    return pb.Command(
        id=command["id"],
        type=command["type"],
        string_params=command.get("string_params", {}),
        int_params=command.get("int_params", {}),
        bool_params=command.get("bool_params", {}),
        string_array_params=command.get("string_array_params", []),
        created_at=int(command.get("created_at", 0)),
    )
