"""The MIGlet gateway: one grpc.aio stream per VM, commands relayed from Redis, agent
messages relayed to workers.

Delivery is outbox-first: a worker writes the command to the VM's outbox in Redis and
publishes a wake-up; whichever replica holds the VM's stream reads the outbox and sends
what this stream has not sent yet. On (re)connect the whole outbox is replayed in order,
so a lost wake-up (Redis pub/sub is at-most-once) or a VM moving to another replica
loses nothing. A session's id (replica id + random) is written to the VM record, so a
replica that lost the VM cannot mark it disconnected.

Any relay failure on a stream (Redis or the broker down while an event or ack is in
hand) ends that stream with UNAVAILABLE: the agent reconnects and resends, rather than
the gateway dropping what it was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import redis.asyncio as aioredis

from migctl.domain.model import AgentState, InfraStatus, Lifecycle, Vm
from migctl.gateway import background
from migctl.gateway.auth import Authenticator
from migctl.gateway.messages import (
    ERRORS_LOGGED,
    capabilities,
    command_message,
    connect_ack,
    error,
    event_ok,
)
from migctl.gateway.outbox import Outbox
from migctl.gateway.relay import Relay
from migctl.gateway.sessions import Session, Sessions
from migctl.gateway.stats import GatewayStats
from migctl.gateway.transport import Malformed
from migctl.settings import Settings
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REDIS_CONNECTIONS = 16
POOL_WAIT_S = 30.0
# A stream that says nothing for this long after opening is not an agent.
CONNECT_TIMEOUT_S = 30.0
AgentMessages = AsyncIterator[pb.MIGletMessage | Malformed]


class Gateway(pb_grpc.CommandServiceServicer):
    def __init__(
        self,
        settings: Settings,
        relay: Relay,
        redis_url: str,
        *,
        auth: Authenticator | None = None,
        gateway_id: str = "",
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.relay = relay
        self.store = relay.store
        self.redis_url = redis_url
        self.auth = auth or Authenticator(settings, relay.store)
        # Connections for the hot paths (outbox reads, heartbeat writes), bounded so a
        # reconnect storm queues for them instead of opening thousands.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=REDIS_CONNECTIONS,
            # A bounded wait: a pool that ran dry (a connection never given back) fails
            # the call, which is logged and retried, instead of hanging it forever.
            timeout=POOL_WAIT_S,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self.redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self.outbox = Outbox(self.redis, relay.store.k)
        self.id = gateway_id or uuid.uuid4().hex[:8]
        self.connect_timeout = connect_timeout
        self.sessions = Sessions()
        self.stats = GatewayStats()
        self.beats: dict[str, float] = {}  # vm_id -> last heartbeat, until the next flush
        self.accepting = True
        self._holding = 0  # admitted streams whose handler has not finished
        self._drained = asyncio.Event()
        self._drained.set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start_background(self) -> None:
        self._tasks = [
            asyncio.create_task(background.wakeups(self)),
            asyncio.create_task(background.flush_loop(self)),
            asyncio.create_task(background.sweep_loop(self)),
            asyncio.create_task(background.epoch_loop(self)),
        ]

    async def shutdown(self, grace: float) -> None:
        """End every stream (agents reconnect, to another replica), wait for their
        disconnects to be recorded within `grace`, then flush and withdraw."""
        self.accepting = False
        n = self.sessions.close_all(grpc.StatusCode.UNAVAILABLE, "gateway shutting down; reconnect")
        log.info("gateway %s: ending %d streams", self.id, n)
        try:
            await asyncio.wait_for(self._drained.wait(), grace)
        except TimeoutError:
            log.warning(
                "gateway %s: %d streams still ending after %.0fs", self.id, self._holding, grace
            )
        await self.stop_background()

    async def stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for session in self.sessions:
            session.close()
        await background.final_flush(self)
        await self.redis.aclose()

    def spawn(self, coro: Any) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # -- the stream ----------------------------------------------------------------------

    async def StreamCommands(
        self, request_iterator: AgentMessages, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ControllerMessage]:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway shutting down; reconnect")
        first = await _first(request_iterator, self.connect_timeout)
        self.stats.frames += first is not None
        if not isinstance(first, pb.MIGletMessage) or first.WhichOneof("message") != "connect":
            self.stats.refuse("protocol")
            if isinstance(first, Malformed):
                self.stats.malformed += 1
            yield error("protocol", "the first message must be connect")
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("the first message must be connect")
            return
        hello = first.connect
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        try:
            verdict = await self.relay.run(self.auth.admit, hello, metadata)
        except Exception as exc:
            self.stats.refuse("unavailable")
            log.warning("cannot admit %r now: %s", hello.vm_id[:128], exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store unavailable; retry")
        if not verdict.ok:
            self.stats.refuse(verdict.reason)
            log.warning(
                "refused agent vm=%r pool=%r: %s",
                hello.vm_id[:128],
                hello.pool_id[:128],
                verdict.message,
            )
            if verdict.status is not None:
                await context.abort(verdict.status, verdict.message)
            yield connect_ack(False, verdict.message)
            return
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway shutting down; reconnect")
        session = Session(hello.vm_id, capabilities(hello), id=f"{self.id}-{uuid.uuid4().hex[:16]}")
        if self.sessions.add(session) is not None:
            self.stats.replaced += 1
        self._holding += 1
        self._drained.clear()
        reader: asyncio.Task[None] | None = None
        try:
            try:
                await self.relay.run(self._connected, session)
                # Another replica still holding this VM (a stream the agent abandoned)
                # lets go of it.
                await self.outbox.announce(session.vm_id, session.id, session.started)
            except Exception as exc:
                log.warning("cannot record the connect of %s: %s", session.vm_id, exc)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "controller store unavailable; retry"
                )
            self.stats.accepted += 1
            yield connect_ack(True, "welcome")
            reader = asyncio.create_task(self._read(session, request_iterator))
            self.spawn(self.deliver(session))
            while True:
                item = await session.outbound.get()
                if item is None:
                    break
                msg, expires_at = item
                if expires_at and expires_at <= time.time():
                    self.stats.commands_expired += 1
                    continue
                yield msg
                if msg.WhichOneof("message") == "command":
                    self.stats.commands_sent += 1
            if session.end_code is not None:
                context.set_code(session.end_code)
                context.set_details(session.end_details)
        finally:
            if reader is not None:
                reader.cancel()
            self.sessions.remove(session)  # before any await: nothing may reach it now
            session.closed = True
            self.stats.disconnects += 1
            try:
                await self.relay.run(self.relay.events.disconnected, session.vm_id, session.id)
            except Exception as exc:  # the heartbeat sweep will notice the silence
                log.warning("could not record the disconnect of %s: %s", session.vm_id, exc)
            finally:
                self._holding -= 1
                if self._holding == 0:
                    self._drained.set()

    def _connected(self, session: Session) -> None:
        def update(vm: Vm) -> Vm:
            if not self.sessions.current(session):
                return vm  # already replaced by a newer stream of this VM
            agent = vm.agent if vm.agent is not AgentState.NONE else AgentState.CONNECTING
            lifecycle = Lifecycle.NONE if vm.lifecycle is Lifecycle.STARTING else vm.lifecycle
            now = time.time()
            if vm.infra in (InfraStatus.CREATING, InfraStatus.STARTING, InfraStatus.UNKNOWN):
                # An agent talking proves its VM runs, whatever the last listing said; a
                # VM that vanished before the sync saw it RUNNING must still be missed
                # by the health sweep when its agent goes silent.
                vm = vm.with_(infra=InfraStatus.RUNNING, state_since=now)
            return vm.with_(
                connected=True,
                session=session.id,
                capabilities=session.capabilities,
                agent=agent,
                lifecycle=lifecycle,
                last_heartbeat=now,
                unhealthy=False,
            )

        self.relay.events._update_vm(session.vm_id, update)

    def taken_elsewhere(self, notice: str) -> None:
        """A replica took a VM: end this replica's older session of it, if any."""
        try:
            taken = json.loads(notice)
            holder = self.sessions.get(str(taken["vm"]))
            newer = holder is not None and holder.started < float(taken["at"])
        except (ValueError, KeyError, TypeError):
            return
        if holder is not None and newer and holder.id != taken["session"]:
            holder.close(grpc.StatusCode.ABORTED, "this VM connected through another gateway")

    # -- agent -> workers ----------------------------------------------------------------

    async def _read(self, session: Session, request_iterator: AgentMessages) -> None:
        try:
            async for msg in request_iterator:
                self.stats.frames += 1
                if session.closed:
                    return
                if isinstance(msg, Malformed):
                    self.stats.malformed += 1
                    session.send(error("malformed", "a frame that is not a MIGletMessage"))
                    session.close(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {msg.error}")
                    return
                try:
                    await self._handle(session, msg)
                except Exception as exc:
                    log.warning("relay for %s failed (%s); ending its stream", session.vm_id, exc)
                    session.close(grpc.StatusCode.UNAVAILABLE, "controller unavailable; reconnect")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call broke under the iterator
            log.debug("stream of %s ended: %s", session.vm_id, exc)
        finally:
            session.close()

    async def _handle(self, session: Session, msg: pb.MIGletMessage) -> None:
        kind = msg.WhichOneof("message")
        if kind == "heartbeat":
            await self._heartbeat(session, msg.heartbeat)
        elif kind == "event":
            await self._event(session, msg.event)
        elif kind == "command_ack":
            await self._ack(session, msg.command_ack)
        elif kind == "error":
            session.errors_logged += 1
            if session.errors_logged <= ERRORS_LOGGED:
                log.warning(
                    "agent %s reports %s: %s",
                    session.vm_id,
                    msg.error.code[:64],
                    msg.error.message[:200],
                )
        else:  # a second connect, or a oneof member newer than this gateway
            self.stats.ignored += 1

    async def _heartbeat(self, session: Session, beat: pb.Heartbeat) -> None:
        self.beats[session.vm_id] = time.time()
        self.stats.heartbeats += 1
        state = beat.miglet_state
        if not state or state == session.state or not self.sessions.current(session):
            return
        parsed = AgentState.parse(state)
        if parsed is AgentState.NONE:
            self.stats.ignored += 1  # a state this controller does not know: keep the last
        else:
            report = functools.partial(
                self.relay.events.agent_state,
                session=session.id,
                holds=lambda: self.sessions.current(session),
            )
            await self.relay.run(report, session.vm_id, parsed)
        session.state = state

    async def _event(self, session: Session, ev: pb.EventNotification) -> None:
        data = dict(ev.data)
        if not event_ok(ev.type, data):
            self.stats.events_dropped += 1
            log.warning(
                "dropped event %r (%d keys) from %s", ev.type[:64], len(data), session.vm_id
            )
            return
        args = (session.vm_id, ev.type, data, ev.timestamp)
        if not await self.outbox.first_sight(*args):
            self.stats.events_duplicate += 1
            return
        try:
            await self.relay.run(
                self.relay.send_task,
                "migctl.agent_event",
                session.vm_id,
                ev.type,
                data,
                float(ev.timestamp),  # when the agent saw it: orders it against our writes
            )
        except Exception:
            with contextlib.suppress(Exception):  # else the resent event is a "duplicate"
                await self.outbox.forget_sight(*args)
            raise
        self.stats.events += 1

    async def _ack(self, session: Session, ack: pb.CommandAck) -> None:
        if not ack.command_id or len(ack.command_id) > 128:
            self.stats.ignored += 1
            return
        delivered = ack.command_id in session.sent
        if not await self.outbox.ack_pending(session.vm_id, ack.command_id, delivered):
            self.stats.acks_duplicate += 1
            return
        # The workers first, then the record: if the broker fails, nothing is recorded,
        # the stream ends, and the command is replayed and acked again.
        await self.relay.run(
            self.relay.send_task,
            "migctl.command_acked",
            session.vm_id,
            ack.command_id,
            ack.success,
            ack.message[:1000],
        )
        outcome = {
            "success": ack.success,
            "message": ack.message[:1000],
            "result": dict(ack.result),
            "at": time.time(),
        }
        await self.outbox.record_ack(session.vm_id, ack.command_id, outcome, delivered)
        self.stats.acks += 1

    # -- workers -> agent ----------------------------------------------------------------

    async def deliver(self, session: Session) -> None:
        """Send this stream, in outbox order, whatever it holds that was not sent yet."""
        if session.delivering:
            session.again = True
            return
        session.delivering = True
        try:
            while not session.closed:
                session.again = False
                pending = await self.outbox.pending(session.vm_id)
                for command in pending:
                    if command.get("id") in session.sent:
                        continue
                    try:
                        msg = command_message(command)
                    except Exception as exc:
                        log.error("unsendable command in %s's outbox: %s", session.vm_id, exc)
                        continue
                    session.sent.add(command["id"])
                    session.send(msg, float(command.get("expires_at") or 0.0))
                if not session.again:
                    return
        except Exception as exc:  # Redis down: the outbox sweep tries again
            log.warning("could not read the outbox of %s: %s", session.vm_id, exc)
        finally:
            session.delivering = False


async def _first(iterator: AgentMessages, timeout: float) -> pb.MIGletMessage | Malformed | None:
    try:
        return await asyncio.wait_for(iterator.__anext__(), timeout)
    except (StopAsyncIteration, TimeoutError):
        return None
