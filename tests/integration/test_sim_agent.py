"""The simulated MIGlet over real grpc.aio against a scripted controller written here.

Keepalive, observed with grpcio 1.85 (C-core server in Python, agent as configured here):
- Default server ping policy (5 min minimum between pings without data, 2 strikes), silent
  agent (no message after the first heartbeat): GOAWAY ENHANCE_YOUR_CALM "too_many_pings"
  at the 4th keepalive ping (the first one after a quiet spell is free, then 3 strikes);
  the agent sees `UNAVAILABLE: Too many pings` and reconnects. 1 s pings: dropped after
  ~4.4 s; the deployed agents' 10 s pings: dropped within 45 s.
- Same default server, agent heartbeating: traffic on the stream resets the strikes, so the
  drop needs more than 3 ping intervals without a message. 10 s pings with heartbeats every
  15 s or 35 s: kept for 80 s; at 1:10 scale (1 s pings) heartbeats every 3 s: kept, every
  5 s: dropped. Do not rely on that: longer heartbeat intervals and quiet agents get
  dropped, and a grpc-go server resets strikes only when it sends data (from its source,
  not measured here). The gateway must permit the pings.
- Server with `grpc.http2.min_ping_interval_without_data_ms=10000`,
  `grpc.keepalive_permit_without_calls=1`, `grpc.http2.max_pings_without_data=0`: a silent
  agent pinging every 10 s stayed connected for 45 s with no disconnect (the C-core client
  schedules each ping a full interval after the previous one, so none arrives early).
The fast tests below use the 1:10 scale; MIGCTL_KEEPALIVE_OBSERVE=1 runs the production
numbers (about 45 s each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc import aio

from migctl.domain.model import AgentState
from migctl.gateway.testing import make_certs
from migctl.sim.agent import AgentTls, SimAgent
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc

pytestmark = pytest.mark.integration

PERMISSIVE = [
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


# -- a scripted controller -----------------------------------------------------------------


class Controller(commands_pb2_grpc.CommandServiceServicer):
    """Records what agents send; sends the commands the test queues."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.connects: list[pb.ConnectRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.peers: list[dict[str, Any]] = []
        self.received: list[pb.MIGletMessage] = []
        self.first_kinds: list[str] = []
        self.ended = 0
        self.outbox: asyncio.Queue[pb.ControllerMessage] = asyncio.Queue()
        self.end_streams = asyncio.Event()

    async def StreamCommands(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        self.first_kinds.append(first.WhichOneof("message"))
        self.connects.append(first.connect)
        self.metadata.append(dict(context.invocation_metadata()))
        self.peers.append(context.auth_context())
        ack = pb.ConnectAck(accepted=self.accept, message="" if self.accept else "go away")
        await context.write(pb.ControllerMessage(connect_ack=ack))
        if not self.accept:
            return
        sender = asyncio.create_task(self._send(context))
        try:
            while True:
                msg = await context.read()
                if msg is aio.EOF:
                    return
                self.received.append(msg)
        finally:
            sender.cancel()
            self.ended += 1

    async def _send(self, context: Any) -> None:
        while True:
            msg = await self.outbox.get()
            await context.write(msg)

    def command(self, id_: str, type_: str, labels: Sequence[str] = (), **params: Any) -> None:
        strings = {k: str(v) for k, v in params.items() if not isinstance(v, bool | int)}
        ints = {k: v for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool)}
        bools = {k: v for k, v in params.items() if isinstance(v, bool)}
        cmd = pb.Command(
            id=id_,
            type=type_,
            string_params=strings,
            int_params=ints,
            bool_params=bools,
            string_array_params=labels,
            created_at=int(time.time()),
        )
        self.outbox.put_nowait(pb.ControllerMessage(command=cmd))

    # observations

    def events(self, type_: str | None = None) -> list[pb.EventNotification]:
        return [
            m.event
            for m in self.received
            if m.WhichOneof("message") == "event" and type_ in (None, m.event.type)
        ]

    def acks(self, command_id: str) -> list[pb.CommandAck]:
        return [
            m.command_ack
            for m in self.received
            if m.WhichOneof("message") == "command_ack" and m.command_ack.command_id == command_id
        ]

    def states(self) -> list[str]:
        """Heartbeat states in order, consecutive repeats folded."""
        out: list[str] = []
        for m in self.received:
            if m.WhichOneof("message") == "heartbeat":
                state = m.heartbeat.miglet_state
                if not out or out[-1] != state:
                    out.append(state)
        return out

    def index(self, pred: Callable[[pb.MIGletMessage], bool]) -> int:
        return next(i for i, m in enumerate(self.received) if pred(m))


def is_event(type_: str) -> Callable[[pb.MIGletMessage], bool]:
    return lambda m: m.WhichOneof("message") == "event" and m.event.type == type_


def is_ack(command_id: str) -> Callable[[pb.MIGletMessage], bool]:
    return lambda m: (
        m.WhichOneof("message") == "command_ack" and m.command_ack.command_id == (command_id)
    )


async def until(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Wait for a condition (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(any(x == w for x in it) for w in wanted)


@contextlib.asynccontextmanager
async def serve(
    controller: Controller,
    options: Sequence[tuple[str, Any]] = (),
    port: int = 0,
    creds: grpc.ServerCredentials | None = None,
) -> AsyncIterator[int]:
    server = aio.server(options=list(options))
    commands_pb2_grpc.add_CommandServiceServicer_to_server(controller, server)
    address = f"127.0.0.1:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace=None)


# -- a fake GitHub with the SimRunnerClient API ------------------------------------------------


class FakeRunners:
    """Hands queued jobs to any registered runner whose labels cover them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.jobs: deque[dict[str, Any]] = deque()
        self.registrations: list[dict[str, Any]] = []
        self.runners: dict[int, tuple[str, ...]] = {}
        self.completed: list[tuple[int, str, str]] = []
        self.removed: list[int] = []
        self.renewals: list[tuple[int, str]] = []
        self.fail_register = ""

    def add_job(self, job_id: str, labels: Sequence[str] = (), **extra: Any) -> None:
        job = {"job_id": job_id, "run_id": f"run-{job_id}", "repository": "acme/app"}
        job |= {"duration": 0.05, "conclusion": "success", "labels": tuple(labels)} | extra
        with self._cond:
            self.jobs.append(job)
            self._cond.notify_all()

    def register(
        self, url: str, name: str, labels: Sequence[str], token: str = "", jit_config: str = ""
    ) -> int:
        if self.fail_register:
            raise RuntimeError(self.fail_register)
        with self._cond:
            self.registrations.append(
                {
                    "url": url,
                    "name": name,
                    "labels": list(labels),
                    "token": token,
                    "jit": jit_config,
                }
            )
            runner_id = len(self.registrations)
            self.runners[runner_id] = tuple(labels)
            return runner_id

    def next_job(self, runner_id: int, wait: float) -> dict[str, Any] | None:
        with self._cond:
            deadline = time.monotonic() + wait
            while True:
                labels = self.runners[runner_id]
                for job in self.jobs:
                    if set(job["labels"]) <= set(labels):
                        self.jobs.remove(job)
                        return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def complete(self, runner_id: int, job_id: str, conclusion: str) -> None:
        with self._cond:
            self.completed.append((runner_id, job_id, conclusion))

    def renew(self, runner_id: int, job_id: str) -> None:
        with self._cond:
            self.renewals.append((runner_id, job_id))

    def remove(self, runner_id: int) -> None:
        with self._cond:
            self.removed.append(runner_id)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def github() -> FakeRunners:
    return FakeRunners()


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-github")
    yield pool
    pool.shutdown(wait=True)


@contextlib.asynccontextmanager
async def running(agent: SimAgent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def make_agent(port: int, github: FakeRunners, executor: ThreadPoolExecutor, **kw: Any) -> SimAgent:
    options: dict[str, Any] = {"heartbeat_interval": 0.2, "poll_wait": 0.1, "backoff_base": 0.05}
    return SimAgent(
        "vm-1", "pool-a", "acme", f"127.0.0.1:{port}", github, executor=executor, **options | kw
    )


REGISTER = {
    "registration_token": "reg-tok",
    "runner_url": "https://github.com/acme",
    "runner_group": "default",
}


# -- tests -------------------------------------------------------------------------------------


def test_connects_first_then_ready(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor, capabilities=["jit"], token="s3cret")
            async with running(agent):
                await until(lambda: ctl.states() == ["ready"])
                await until(lambda: len(ctl.received) >= 4)  # periodic heartbeats too
        assert ctl.first_kinds == ["connect"]
        hello = ctl.connects[0]
        assert (hello.vm_id, hello.pool_id, hello.org_id) == ("vm-1", "pool-a", "acme")
        assert hello.version and list(hello.capabilities) == ["jit"]
        assert ctl.metadata[0]["authorization"] == "Bearer s3cret"
        assert ctl.received[0].event.type == "vm_started"
        beat = ctl.received[1].heartbeat
        assert beat.vm_id == "vm-1" and beat.runner_state.state == "offline"
        assert 0 < beat.health.cpu_usage_percent < 100 and beat.health.memory_total_bytes > 0

    asyncio.run(scenario())


def test_rejected_agent_stops_for_good(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller(accept=False)
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor)
            await asyncio.wait_for(agent.run(), 10)
        assert agent.finished == "rejected: go away"
        assert agent.state == AgentState.ERROR
        assert len(ctl.connects) == 1

    asyncio.run(scenario())


def test_register_runner_runs_one_job(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.add_job("j-1", labels=["linux"], conclusion="failure")
        async with serve(ctl) as port, running(make_agent(port, github, executor)) as _:
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux", "x64"], runner_name="r-1", **REGISTER)
            await until(lambda: ctl.events("job_completed"))
            await until(lambda: ctl.states()[-1] == "ready")
        assert github.registrations == [
            {
                "url": "https://github.com/acme",
                "name": "r-1",
                "labels": ["linux", "x64"],
                "token": "reg-tok",
                "jit": "",
            }
        ]
        assert ctl.acks("c-1")[0].success
        order = [
            ctl.index(is_ack("c-1")),
            ctl.index(is_event("runner_registered")),
            ctl.index(is_event("job_started")),
            ctl.index(is_event("job_completed")),
        ]
        assert order == sorted(order)
        registered = ctl.events("runner_registered")[0].data
        assert dict(registered) == {
            "runner_url": "https://github.com/acme",
            "runner_group": "default",
        }
        assert dict(ctl.events("job_started")[0].data) == {"job_id": "j-1", "run_id": "run-j-1"}
        done = dict(ctl.events("job_completed")[0].data)
        assert done == {"job_id": "j-1", "run_id": "run-j-1", "success": "false"}
        assert github.completed == [(1, "j-1", "failure")]
        assert is_subsequence(
            ["ready", "registering_runner", "idle", "job_running", "ready"], ctl.states()
        )
        running_beats = [
            m.heartbeat
            for m in ctl.received
            if m.WhichOneof("message") == "heartbeat" and m.heartbeat.miglet_state == "job_running"
        ]
        assert running_beats[0].current_job.job_id == "j-1"
        assert running_beats[0].runner_state.state == "running"
        assert list(running_beats[0].runner_state.labels) == ["linux", "x64"]

    asyncio.run(scenario())


def test_runner_name_defaults_to_vm_id_and_jit_is_used(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], jit_config="b64jit")
            await until(lambda: ctl.acks("c-1"))
        assert ctl.acks("c-1")[0].success
        assert github.registrations[0]["name"] == "vm-1"
        assert github.registrations[0]["jit"] == "b64jit"

    asyncio.run(scenario())


def test_keys_token_and_url_are_not_read(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", token="t", url="https://github.com/acme")
            await until(lambda: ctl.acks("c-1"))
        assert not ctl.acks("c-1")[0].success
        assert github.registrations == []

    asyncio.run(scenario())


def test_failed_registration_acks_false_and_returns_to_ready(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.fail_register = "401 invalid registration token"
        async with serve(ctl) as port, running(make_agent(port, github, executor)) as _:
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.acks("c-1"))
            await until(lambda: ctl.states()[-1] == "ready")
        ack = ctl.acks("c-1")[0]
        assert not ack.success and "invalid registration token" in ack.message
        assert ctl.states() == ["ready", "registering_runner", "ready"]
        assert ctl.events("runner_registered") == []

    asyncio.run(scenario())


def test_replayed_command_is_acked_again_not_rerun(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.add_job("j-1", labels=["linux"])
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.events("job_completed"))
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: len(ctl.acks("c-1")) == 2)
        assert len(github.registrations) == 1
        assert [a.success for a in ctl.acks("c-1")] == [True, True]
        assert len(ctl.events("runner_registered")) == 1

    asyncio.run(scenario())


def test_unknown_command_is_unsupported(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "make_coffee")
            await until(lambda: ctl.acks("c-1"))
        ack = ctl.acks("c-1")[0]
        assert not ack.success and "unsupported" in ack.message

    asyncio.run(scenario())


def test_register_while_busy_is_refused(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.states()[-1] == "idle")
            ctl.command("c-2", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.acks("c-2"))
        assert not ctl.acks("c-2")[0].success
        assert len(github.registrations) == 1

    asyncio.run(scenario())


def test_drain_idle_removes_the_runner(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> SimAgent:
        ctl = Controller()
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor)
            async with running(agent):
                await until(lambda: ctl.states())
                ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
                await until(lambda: ctl.states()[-1] == "idle")
                ctl.command("d-1", "drain", reason="scale down", timeout=30)
                await until(lambda: ctl.acks("d-1"))
                await until(lambda: ctl.states()[-1] == "ready")
        assert ctl.acks("d-1")[0].success
        assert ctl.states()[-3:] == ["idle", "draining", "ready"]
        return agent

    agent = asyncio.run(scenario())
    assert github.removed == [1]
    assert agent.drained and agent.runner_id is None


def test_drain_while_running_finishes_the_job_first(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.add_job("j-1", labels=["linux"], duration=0.5)
        async with serve(ctl) as port, running(make_agent(port, github, executor)):
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.events("job_started"))
            ctl.command("d-1", "drain", reason="scale down")
            await until(lambda: ctl.acks("d-1"))
        assert ctl.acks("d-1")[0].success
        assert ctl.index(is_event("job_completed")) < ctl.index(is_ack("d-1"))
        assert github.completed == [(1, "j-1", "success")]
        assert github.removed == []  # the ephemeral runner left with its job

    asyncio.run(scenario())


def test_shutdown_closes_the_stream(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor)
            task = asyncio.create_task(agent.run())
            await until(lambda: ctl.states())
            ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: ctl.states()[-1] == "idle")
            ctl.command("s-1", "shutdown", reason="idle", force=False)
            await asyncio.wait_for(task, 10)
            await until(lambda: ctl.ended == 1)
        assert agent.finished == "shutdown"
        assert ctl.acks("s-1")[0].success
        assert ctl.events("vm_shutting_down")
        assert ctl.states()[-1] == "shutting_down"
        assert len(ctl.connects) == 1
        assert github.removed == [1]

    asyncio.run(scenario())


def test_reconnects_after_the_server_restarts(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> None:
        first, second = Controller(), Controller()
        github.add_job("j-1", labels=["linux"])
        server = aio.server()
        commands_pb2_grpc.add_CommandServiceServicer_to_server(first, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        agent = make_agent(port, github, executor)
        async with running(agent):
            await until(lambda: first.states())
            first.command("c-1", "register_runner", ["linux"], **REGISTER)
            await until(lambda: first.events("job_completed"))
            await server.stop(grace=None)
            await until(lambda: agent.disconnects)
            async with serve(second, port=port):
                await until(lambda: second.states() == ["ready"])
                # The new gateway replays a command it has no ack for: acked, not re-run.
                second.command("c-1", "register_runner", ["linux"], **REGISTER)
                await until(lambda: second.acks("c-1"))
        assert agent.connects == 2
        assert second.first_kinds == ["connect"]
        assert second.acks("c-1")[0].success
        assert len(github.registrations) == 1
        assert second.events("vm_started") == []  # once per boot, not per stream

    asyncio.run(scenario())


def test_a_job_survives_a_dropped_stream(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.add_job("j-1", labels=["linux"], duration=0.5)
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor)
            async with running(agent):
                await until(lambda: ctl.states())
                ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
                await until(lambda: ctl.events("job_started"))
                agent.kill()
                await until(lambda: ctl.events("job_completed"))
        assert agent.connects == 2
        assert ctl.ended >= 1
        assert agent.disconnects[0] == "killed"
        assert github.completed == [(1, "j-1", "success")]

    asyncio.run(scenario())


def test_crash_runner(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor)
            async with running(agent):
                await until(lambda: ctl.states())
                ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
                await until(lambda: ctl.states()[-1] == "idle")
                agent.crash_runner("segfault")
                await until(lambda: ctl.events("runner_crashed"))
                await until(lambda: ctl.states()[-1] == "ready")
                # Usable again: a new registration is accepted.
                ctl.command("c-2", "register_runner", ["linux"], **REGISTER)
                await until(lambda: ctl.acks("c-2"))
        assert dict(ctl.events("runner_crashed")[0].data) == {"reason": "segfault"}
        assert ctl.acks("c-2")[0].success

    asyncio.run(scenario())


def test_duplicate_events(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        ctl = Controller()
        github.add_job("j-1", labels=["linux"])
        agent = None
        async with serve(ctl) as port:
            agent = make_agent(port, github, executor, duplicate_events=True)
            async with running(agent):
                await until(lambda: ctl.states())
                ctl.command("c-1", "register_runner", ["linux"], **REGISTER)
                await until(lambda: len(ctl.events("job_completed")) == 2)
        for kind in ("vm_started", "runner_registered", "job_started", "job_completed"):
            assert len(ctl.events(kind)) == 2
        assert len(ctl.acks("c-1")) == 1

    asyncio.run(scenario())


def test_mtls_and_bearer_token(github: FakeRunners, executor: ThreadPoolExecutor) -> None:
    certs = make_certs("vm-1")
    creds = grpc.ssl_server_credentials(
        [(certs["server_key"], certs["server_cert"])],
        root_certificates=certs["ca"],
        require_client_auth=True,
    )
    tls = AgentTls(certs["ca"], certs["client_key"], certs["client_cert"])

    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl, creds=creds) as port:
            agent = make_agent(port, github, executor, tls=tls, token="vm-token")
            async with running(agent):
                await until(lambda: ctl.states() == ["ready"])
        assert ctl.peers[0]["transport_security_type"] == [b"ssl"]
        assert ctl.peers[0]["x509_common_name"] == [b"vm-1"]
        assert ctl.metadata[0]["authorization"] == "Bearer vm-token"

    asyncio.run(scenario())


# -- keepalive (see the module docstring for what was observed) -------------------------------


def _silent_agent(port: int, github: FakeRunners, executor: ThreadPoolExecutor, ka_ms: int):
    # No heartbeat after the first: only keepalive pings cross the connection.
    return make_agent(port, github, executor, heartbeat_interval=3_600, keepalive_ms=ka_ms)


@pytest.mark.slow
def test_default_ping_policy_drops_a_silent_agent(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    async def scenario() -> SimAgent:
        ctl = Controller()
        async with serve(ctl) as port:
            agent = _silent_agent(port, github, executor, ka_ms=1_000)
            async with running(agent):
                await until(lambda: len(ctl.connects) >= 2, timeout=30)
        return agent

    agent = asyncio.run(scenario())
    assert "Too many pings" in agent.disconnects[0]


@pytest.mark.slow
def test_permissive_ping_policy_keeps_a_silent_agent(
    github: FakeRunners, executor: ThreadPoolExecutor
) -> None:
    # 1:10 scale of the gateway's policy: 1 s pings against a 1 s minimum interval.
    options = [*PERMISSIVE[1:], ("grpc.http2.min_ping_interval_without_data_ms", 1_000)]

    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl, options) as port:
            agent = _silent_agent(port, github, executor, ka_ms=1_000)
            async with running(agent):
                await until(lambda: ctl.states() == ["ready"])
                await asyncio.sleep(6)  # an observation window: ~6 pings, 3 strikes would drop
                assert len(ctl.connects) == 1
                assert list(agent.disconnects) == []

    asyncio.run(scenario())


observe = pytest.mark.skipif(
    os.environ.get("MIGCTL_KEEPALIVE_OBSERVE") != "1",
    reason="production keepalive numbers take ~40 s; set MIGCTL_KEEPALIVE_OBSERVE=1",
)


@observe
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["default", "permissive"])
def test_production_keepalive_numbers(
    github: FakeRunners, executor: ThreadPoolExecutor, policy: str
) -> None:
    options = PERMISSIVE if policy == "permissive" else []

    async def scenario() -> None:
        ctl = Controller()
        async with serve(ctl, options) as port:
            agent = _silent_agent(port, github, executor, ka_ms=10_000)
            async with running(agent):
                await asyncio.sleep(45)
                if policy == "default":
                    assert "Too many pings" in agent.disconnects[0]
                else:
                    assert list(agent.disconnects) == []

    asyncio.run(scenario())
