"""A simulated MIGlet: the real wire protocol over real grpc.aio, runners on the fake GitHub.

It behaves as PROTOCOL.md says a deployed agent does: keepalive pings every 10 s even
without calls, `connect` first, heartbeats on every state change and every interval,
ephemeral runners (one job per `register_runner`), reconnects with capped exponential
backoff and jitter. The runner's life (register, long-poll, run one job) is agent-level,
not stream-level: a dropped stream does not stop a running job, as on a real VM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio

from migctl.domain.errors import NotFound, PermanentError
from migctl.domain.model import AgentState
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc

log = logging.getLogger(__name__)

VERSION = "migctl-sim/0.1"
_T = TypeVar("_T")
_CLOSE = None  # outbox sentinel: half-close the stream once everything before it is written


class RunnerClient(Protocol):
    """What the agent needs of GitHub (`migctl.sim.runner_client.SimRunnerClient`). Blocking."""

    def register(
        self, url: str, name: str, labels: Sequence[str], token: str = "", jit_config: str = ""
    ) -> int: ...

    def next_job(self, runner_id: int, wait: float) -> dict[str, Any] | None: ...

    def complete(self, runner_id: int, job_id: Any, conclusion: str) -> None: ...

    def renew(self, runner_id: int, job_id: str) -> None: ...

    def remove(self, runner_id: int) -> None: ...


@dataclass(frozen=True)
class AgentTls:
    """TLS for the agent's channel: the CA to trust, and a client cert/key for mTLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str = ""  # overrides the name checked against the gateway's certificate

    @classmethod
    def from_files(
        cls, ca: str | None, cert: str | None = None, key: str | None = None, server_name: str = ""
    ) -> AgentTls:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(key), read(cert), server_name)


_executor: ThreadPoolExecutor | None = None


def default_executor() -> ThreadPoolExecutor:
    """The threads that run every agent's blocking GitHub calls in this process."""
    global _executor
    if _executor is None:
        # An idle agent holds one thread per ~2 s long-poll. Threads are made lazily, so a
        # cap sized for a 500+ VM fleet costs nothing until such a fleet runs here.
        _executor = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="sim-github")
    return _executor


class SimAgent:
    """One simulated VM agent. `await run()` until shutdown, rejection or cancellation."""

    def __init__(
        self,
        vm_id: str,
        pool_id: str,
        org_id: str,
        target: str,
        github: RunnerClient,
        *,
        heartbeat_interval: float = 15.0,
        capabilities: Iterable[str] = (),
        version: str = VERSION,
        tls: AgentTls | None = None,
        token: str = "",
        executor: ThreadPoolExecutor | None = None,
        poll_wait: float = 2.0,
        keepalive_ms: int = 10_000,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        connect_timeout: float = 30.0,
        duplicate_events: bool = False,
        renew_interval: float = 1.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.vm_id, self.pool_id, self.org_id, self.target = vm_id, pool_id, org_id, target
        self.heartbeat_interval = heartbeat_interval
        self.capabilities = tuple(capabilities)
        self.version = version
        self.duplicate_events = duplicate_events
        self._github = github
        self._tls = tls
        self._token = token
        self._executor = executor or default_executor()
        self._poll_wait = poll_wait
        self._keepalive_ms = keepalive_ms
        self._backoff = (backoff_base, backoff_cap)
        self._connect_timeout = connect_timeout
        self._renew_interval = renew_interval
        self._channel_options = tuple(channel_options)

        self.state = AgentState.INITIALIZING
        self.connected = False
        self.finished = ""  # why run() ended for good: "rejected: ...", "shutdown"
        self.connects = 0  # accepted sessions
        self.disconnects: deque[str] = deque(maxlen=100)  # why each stream ended
        self.errors: list[pb.ErrorNotification] = []  # ErrorNotifications from the controller
        self.drained = False
        self.runner_id: int | None = None
        self.runner_name = ""
        self.labels: tuple[str, ...] = ()
        self.current_job: dict[str, Any] | None = None

        self._acks: dict[str, pb.CommandAck | None] = {}  # command id -> ack (None: running)
        self._outbox: deque[pb.MIGletMessage | None] = deque()
        self._wake = asyncio.Event()
        self._work: asyncio.Task[None] | None = None  # the registered runner's life
        self._draining = False
        self._session: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started_sent = False
        self._accepted = False  # the current session got connect_ack(accepted=true)
        self._killed = False

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve commands, reconnect on failure; return on shutdown or rejection."""
        self._set_state(AgentState.CONNECTING)
        failures = 0
        try:
            while not self.finished:
                self._accepted = False
                session = self._session = asyncio.create_task(self._session_once())
                await asyncio.wait({session})
                if not session.cancelled() and session.exception() is not None:
                    log.error("agent %s: session failed", self.vm_id, exc_info=session.exception())
                if self.finished:
                    break
                failures = 1 if self._accepted else failures + 1
                await asyncio.sleep(self._delay(failures))
        finally:
            tasks = [t for t in (self._session, self._work, *self._tasks) if t is not None]
            for task in tasks:
                task.cancel()
            # Let the session close its channel before we return (the VM is gone for good).
            await asyncio.gather(*tasks, return_exceptions=True)
            self.connected = False

    def kill(self) -> None:
        """Drop the stream abruptly (no half-close); the agent reconnects after a backoff."""
        if self._session is not None and not self._session.done():
            self._killed = True
            self._session.cancel()

    def die(self, reason: str = "agent process died") -> None:
        """The agent process dies for good while its VM stays up: no half-close, no more
        heartbeats, and its runner (and any job on it) stops with it."""
        self.finished = reason
        self.kill()

    def crash_runner(self, reason: str = "simulated runner crash") -> None:
        """The runner process dies: `runner_crashed`, back to ready (job left unfinished)."""
        if self.runner_id is None:
            return
        if self._work is not None:
            self._work.cancel()
            self._work = None
        self._forget_runner()
        self._event("runner_crashed", reason=reason)
        self._set_state(AgentState.READY)

    def _delay(self, failures: int) -> float:
        base, cap = self._backoff
        delay = min(cap, base * 2.0 ** (failures - 1))
        # Equal jitter: spread a fleet's reconnects after a gateway restart, never zero.
        return delay / 2 + random.uniform(0, delay / 2)

    # -- one stream ---------------------------------------------------------------------

    async def _session_once(self) -> None:
        """One stream, from `connect` to its end."""
        channel = self._channel()
        try:
            stub = commands_pb2_grpc.CommandServiceStub(channel)
            call = stub.StreamCommands(metadata=self._metadata())
            await call.write(pb.MIGletMessage(connect=self._connect_request()))
            first = await asyncio.wait_for(call.read(), self._connect_timeout)
            if first is aio.EOF or first.WhichOneof("message") != "connect_ack":
                self.disconnects.append("stream ended before connect_ack")
                return
            if not first.connect_ack.accepted:
                self.finished = f"rejected: {first.connect_ack.message}"
                log.warning("agent %s rejected: %s", self.vm_id, first.connect_ack.message)
                self._set_state(AgentState.ERROR)
                return
            self._accepted = True
            self._on_connected()
            await self._serve(call)
        except aio.AioRpcError as exc:
            self.disconnects.append(f"{exc.code().name}: {exc.details()}")
        except TimeoutError:
            self.disconnects.append("no connect_ack in time")
        except asyncio.CancelledError:
            self.disconnects.append("killed" if self._killed else "agent stopped")
            self._killed = False
            raise
        finally:
            self.connected = False
            await channel.close(grace=None)

    def _on_connected(self) -> None:
        self.connects += 1
        self.connected = True
        # Heartbeats that missed the last stream are stale; events and acks still matter.
        self._outbox = deque(
            m for m in self._outbox if m is _CLOSE or m.WhichOneof("message") != "heartbeat"
        )
        if not self._started_sent:
            self._started_sent = True
            self._event("vm_started")
        if self.state == AgentState.CONNECTING:
            self._set_state(AgentState.READY)
        else:
            self._heartbeat()

    async def _serve(self, call: Any) -> None:
        reader = asyncio.create_task(self._read_loop(call))
        writer = asyncio.create_task(self._write_loop(call))
        ticker = asyncio.create_task(self._heartbeat_loop())
        tasks = {reader, writer, ticker}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and self.finished and writer.exception() is None:
                # Half-closed after shutdown: let the controller end the stream.
                await asyncio.wait({reader}, timeout=2.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_loop(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is aio.EOF:
                self.disconnects.append("controller ended the stream")
                return
            kind = msg.WhichOneof("message")
            if kind == "command":
                self._on_command(msg.command)
            elif kind == "error":
                self.errors.append(msg.error)
                log.warning("agent %s: controller error %s", self.vm_id, msg.error.code)

    async def _write_loop(self, call: Any) -> None:
        while True:
            while not self._outbox:
                self._wake.clear()
                await self._wake.wait()
            msg = self._outbox[0]
            if msg is _CLOSE:
                self._outbox.popleft()
                await call.done_writing()
                return
            await call.write(msg)
            # Popped only once written: a message cut off by a break is resent (at least once).
            self._outbox.popleft()

    async def _heartbeat_loop(self) -> None:
        # A random phase: VMs booted together must not beat in lockstep (a gateway burst).
        await asyncio.sleep(self.heartbeat_interval * random.uniform(0.5, 1.0))
        while True:
            self._heartbeat()
            await asyncio.sleep(self.heartbeat_interval)

    def _channel(self) -> aio.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", self._keepalive_ms),
            ("grpc.keepalive_timeout_ms", 3_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Deployed agents use grpc-go, which keeps pinging without data; C-core would
            # stop after 2 such pings unless told otherwise.
            ("grpc.http2.max_pings_without_data", 0),
            # One TCP connection per agent, as on real VMs, even with many agents per process.
            ("grpc.use_local_subchannel_pool", 1),
            *self._channel_options,
        ]
        if self._tls is None:
            return aio.insecure_channel(self.target, options=options)
        if self._tls.server_name:
            options.append(("grpc.ssl_target_name_override", self._tls.server_name))
        creds = grpc.ssl_channel_credentials(
            self._tls.root_certificates, self._tls.private_key, self._tls.certificate_chain
        )
        return aio.secure_channel(self.target, creds, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def _connect_request(self) -> pb.ConnectRequest:
        return pb.ConnectRequest(
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            version=self.version,
            capabilities=self.capabilities,
        )

    # -- commands -----------------------------------------------------------------------

    def _on_command(self, cmd: pb.Command) -> None:
        if cmd.id in self._acks:
            ack = self._acks[cmd.id]
            if ack is not None:  # replayed after a reconnect: ack again, do not re-run
                self._send(pb.MIGletMessage(command_ack=ack))
            return
        self._acks[cmd.id] = None
        handlers: dict[str, Callable[[pb.Command], Any]] = {
            "register_runner": self._register,
            "drain": self._drain,
            "shutdown": self._shutdown,
            "set_log_level": self._noop,
            "update_config": self._noop,
        }
        handler = handlers.get(cmd.type)
        if handler is None:
            self._ack(cmd, False, f"unsupported command type {cmd.type!r}")
            return
        self._spawn(handler(cmd))

    async def _noop(self, cmd: pb.Command) -> None:
        self._ack(cmd, True, "ok (simulated agent: no effect)")

    async def _register(self, cmd: pb.Command) -> None:
        if self.state != AgentState.READY or self._draining or self._work is not None:
            self._ack(cmd, False, f"cannot register a runner while {self.state.value}")
            return
        params = cmd.string_params
        # Deployed agents read exactly these keys (not `token` or `url`).
        url = params.get("runner_url", "")
        token = params.get("registration_token", "")
        jit = params.get("jit_config", "")
        if not jit and not (url and token):
            self._ack(cmd, False, "register_runner needs runner_url and registration_token")
            return
        name = params.get("runner_name") or self.vm_id
        labels = tuple(cmd.string_array_params)
        self._set_state(AgentState.REGISTERING)
        try:
            runner_id = await self._blocking(
                self._github.register, url, name, list(labels), token=token, jit_config=jit
            )
        except Exception as exc:  # config.sh failed: report why, stay usable
            self._set_state(AgentState.READY)
            self._ack(cmd, False, f"runner registration failed: {exc}")
            return
        self.runner_id, self.runner_name, self.labels = runner_id, name, labels
        self.drained = False
        self._ack(cmd, True, "runner registered", {"runner_name": name})
        self._event(
            "runner_registered", runner_url=url, runner_group=params.get("runner_group", "")
        )
        self._set_state(AgentState.IDLE)
        self._work = asyncio.create_task(self._run_runner(runner_id))

    async def _run_runner(self, runner_id: int) -> None:
        """run.sh of an ephemeral runner: wait for GitHub to hand one job, run it, exit."""
        try:
            job = None
            while job is None:
                if self._draining:
                    return
                try:
                    job = await self._blocking(self._github.next_job, runner_id, self._poll_wait)
                except (NotFound, PermanentError) as exc:
                    # Deregistered under it (removed, replaced): run.sh exits.
                    self._work = None
                    self._forget_runner()
                    self._event("runner_crashed", reason=f"runner gone from GitHub: {exc}")
                    self._set_state(AgentState.READY)
                    return
                except Exception as exc:  # GitHub unreachable: the runner keeps polling
                    log.warning("agent %s: next_job failed: %s", self.vm_id, exc)
                    await asyncio.sleep(self._poll_wait)
            job_id, run_id = str(job["job_id"]), str(job.get("run_id", ""))
            self.current_job = {**job, "started_at": int(time.time())}
            self._event("job_started", job_id=job_id, run_id=run_id)
            self._set_state(AgentState.JOB_RUNNING)
            if await self._run_job(runner_id, job_id, float(job.get("duration", 0.0))):
                conclusion = str(job.get("conclusion", "success"))
                await self._complete(runner_id, job["job_id"], conclusion)
            else:
                conclusion = "failure"  # GitHub took the job away: it failed there
            self._forget_runner()
            success = "true" if conclusion == "success" else "false"
            self._event("job_completed", job_id=job_id, run_id=run_id, success=success)
            self._set_state(AgentState.READY)
        finally:
            if self._work is asyncio.current_task():
                self._work = None

    async def _run_job(self, runner_id: int, job_id: str, duration: float) -> bool:
        """Run the job for `duration`, renewing its lock with GitHub as the runner does
        (a runner that stops renewing is lost and its job failed). False: GitHub has
        taken the job away."""
        end = time.monotonic() + duration
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self._renew_interval))
            if time.monotonic() >= end:
                break
            try:
                await self._blocking(self._github.renew, runner_id, job_id)
            except NotFound:
                log.warning("agent %s: GitHub took job %s away", self.vm_id, job_id)
                return False
            except Exception as exc:  # unreachable for a moment: try at the next renewal
                log.warning("agent %s: renewing job %s failed: %s", self.vm_id, job_id, exc)
        return True

    async def _complete(self, runner_id: int, job_id: Any, conclusion: str) -> None:
        for attempt in range(5):
            try:
                await self._blocking(self._github.complete, runner_id, job_id, conclusion)
                return
            except (NotFound, PermanentError) as exc:  # GitHub already dropped the runner
                log.warning("agent %s: complete(%s) refused: %s", self.vm_id, job_id, exc)
                return
            except Exception as exc:
                log.warning("agent %s: complete(%s) failed: %s", self.vm_id, job_id, exc)
                await asyncio.sleep(0.5 * 2**attempt)

    async def _drain(self, cmd: pb.Command) -> None:
        if self.state == AgentState.REGISTERING:
            self._ack(cmd, False, "registering a runner; drain again once it is idle")
            return
        timeout = _seconds(cmd, "timeout")
        self._draining = True
        try:
            work = self._work
            if work is not None:
                if self.current_job is None:
                    self._set_state(AgentState.DRAINING)
                # The runner stops polling; a job it was handed meanwhile runs to the end.
                await asyncio.wait({work}, timeout=timeout or None)
                if not work.done():
                    self._ack(cmd, False, f"drain timed out after {timeout:g}s: job still running")
                    return
            if self.runner_id is not None:
                self._set_state(AgentState.DRAINING)
                try:
                    await self._blocking(self._github.remove, self.runner_id)
                except Exception as exc:
                    log.warning("agent %s: removing runner failed: %s", self.vm_id, exc)
                self._forget_runner()
            self.drained = True
            self._ack(cmd, True, "drained", {"reason": cmd.string_params.get("reason", "")})
            self._set_state(AgentState.READY)
        finally:
            self._draining = False

    async def _shutdown(self, cmd: pb.Command) -> None:
        force = cmd.bool_params.get("force", False) or cmd.string_params.get("force") == "true"
        work = self._work
        if work is not None and self.current_job is not None and not force:
            self._draining = True
            await asyncio.wait({work})
        if self._work is not None:
            self._work.cancel()
        if self.runner_id is not None:
            try:
                await self._blocking(self._github.remove, self.runner_id)
            except Exception as exc:
                log.warning("agent %s: removing runner failed: %s", self.vm_id, exc)
            self._forget_runner()
        self._ack(cmd, True, "shutting down")
        self._event("vm_shutting_down")
        self._set_state(AgentState.SHUTTING_DOWN)
        self.finished = "shutdown"
        self._send(_CLOSE)

    # -- messages out -------------------------------------------------------------------

    def _set_state(self, state: AgentState) -> None:
        if state != self.state:
            self.state = state
            self._heartbeat()

    def _ack(
        self, cmd: pb.Command, success: bool, message: str, result: dict[str, str] | None = None
    ) -> None:
        ack = pb.CommandAck(command_id=cmd.id, success=success, message=message, result=result)
        self._acks[cmd.id] = ack
        self._send(pb.MIGletMessage(command_ack=ack))

    def _event(self, type_: str, **data: str) -> None:
        event = pb.EventNotification(
            type=type_,
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            data=data,
            timestamp=int(time.time()),
        )
        for _ in range(2 if self.duplicate_events else 1):
            self._send(pb.MIGletMessage(event=event))

    def _heartbeat(self) -> None:
        if not self.connected:
            return  # a heartbeat is about now; never queue one for a later stream
        job = self.current_job
        configured = self.runner_id is not None
        runner = pb.RunnerState(
            state="running" if job else "idle" if configured else "offline",
            configured=configured,
            runner_name=self.runner_name,
            labels=self.labels,
        )
        current = None
        if job is not None:
            current = pb.JobInfo(
                job_id=str(job["job_id"]),
                run_id=str(job.get("run_id", "")),
                repository=str(job.get("repository", "")),
                status="running",
                started_at=int(job["started_at"]),
            )
        beat = pb.Heartbeat(
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            health=_health(busy=job is not None),
            runner_state=runner,
            current_job=current,
            timestamp=int(time.time()),
            miglet_state=self.state.value,
        )
        self._send(pb.MIGletMessage(heartbeat=beat))

    def _send(self, msg: pb.MIGletMessage | None) -> None:
        self._outbox.append(msg)
        self._wake.set()

    # -- helpers ------------------------------------------------------------------------

    def _forget_runner(self) -> None:
        self.runner_id, self.runner_name, self.labels, self.current_job = None, "", (), None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _blocking(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


_GIB = 1024**3


def _health(busy: bool) -> pb.VMHealth:
    """Numbers a 4 vCPU / 16 GiB / 100 GiB runner VM might report."""
    mem_total, disk_total = 16 * _GIB, 100 * _GIB
    cpu = random.uniform(40, 95) if busy else random.uniform(1, 8)
    mem = random.uniform(35, 80) if busy else random.uniform(12, 20)
    disk = random.uniform(30, 45)
    return pb.VMHealth(
        cpu_usage_percent=cpu,
        memory_usage_percent=mem,
        disk_usage_percent=disk,
        memory_total_bytes=mem_total,
        memory_used_bytes=int(mem_total * mem / 100),
        disk_total_bytes=disk_total,
        disk_used_bytes=int(disk_total * disk / 100),
    )


def _seconds(cmd: pb.Command, key: str) -> float:
    """A duration parameter, as int_params or as text (the protocol does not fix which)."""
    if key in cmd.int_params:
        return float(cmd.int_params[key])
    text = cmd.string_params.get(key, "").strip().removesuffix("s")
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0
