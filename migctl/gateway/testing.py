"""Test doubles for the gateway, shipped with it (as procrastinate/testing.py): a client
that behaves like a deployed MIGlet, recorders for what the gateway hands the workers,
throwaway TLS certificates, and a local stand-in for Google's identity token issuer.

Used by the gateway's tests and by bench/gateway_bench.py; nothing here runs in
production.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import redis
import yaml
from grpc import aio

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import InfraStatus, Vm
from migctl.domain.transitions import Change
from migctl.gateway.app import GatewayServer, build
from migctl.gateway.auth import Authenticator
from migctl.services.events import AgentEvents
from migctl.settings import Settings
from migctl.sim.stack import free_port
from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc
from migctl.worker.dispatch import RecordingDispatcher

# A deployed agent's channel (PROTOCOL.md): grpc-go pinging every 10 s, with and without
# streams, 3 s to answer. grpc-go keeps pinging without data; C-core stops after 2
# such pings unless told otherwise, hence max_pings_without_data=0.
DEPLOYED_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# One TCP connection per agent, as on real VMs, even with many agents in one process.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Wait for a condition: a deadline against hangs, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.01)


def assert_no_leaks() -> None:
    """No transport or socket left open (run after the event loop is gone). A leak's
    ResourceWarning would otherwise surface in a later, unrelated garbage collection."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


# -- what the gateway hands the workers -------------------------------------------------


class RecordingSendTask:
    """A `send_task` that records (Celery task name, args) instead of sending."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = False

    def __call__(self, name: str, *args: Any) -> None:
        if self.fail:
            raise ConnectionError("broker unavailable (test)")
        with self._lock:
            self.calls.append((name, args))

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [args for n, args in self.calls if n == name]


# -- a pool in Redis ------------------------------------------------------------------------


def settings_for(pool: str = "pool-a", **server: Any) -> Settings:
    return Settings(
        pool={"id": pool},
        vm_manager={"provider": "sim"},
        github_app={"app_id": "1", "private_key": "unused by the gateway"},
        pubsub={"source": "local"},
        server={"bind": "127.0.0.1", **server},
    )


def add_vm(store: RedisStore, vm_id: str) -> None:
    """A running VM of the pool, as the GCloud sync would record it."""
    now = time.time()
    vm = Vm(id=vm_id, infra=InfraStatus.RUNNING, created_at=now, state_since=now)
    store.save(Change(vms={vm_id: vm}), {})


def enqueue(
    store: RedisStore, vm_id: str, type_: str = "set_log_level", ttl: int = 600, **extra: Any
) -> str:
    """A command into the VM's outbox as a worker writes it (outbox + wake-up)."""
    command = {
        "id": uuid.uuid4().hex,
        "type": type_,
        "string_params": {"level": "debug"},
        "string_array_params": [],
        "created_at": int(time.time()),
        "expires_at": time.time() + ttl,
        **extra,
    }
    store.save(Change(), {}, commands=[(vm_id, command, ttl)])
    return str(command["id"])


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    redis_url: str,
    *,
    send_task: Callable[..., Any] | None = None,
    auth: Authenticator | None = None,
    credentials: grpc.ServerCredentials | None = None,
    port: int = 0,
    gateway_id: str = "",
    grace: float = 5.0,
) -> AsyncIterator[GatewayServer]:
    """An in-process gateway on 127.0.0.1 with its own Redis clients."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, settings.pool.id)
    events = AgentEvents(store, settings, RecordingDispatcher())
    app = build(
        settings,
        store,
        events,
        send_task or RecordingSendTask(),
        redis_url,
        auth=auth,
        address=f"127.0.0.1:{port}",
        credentials=credentials,
        gateway_id=gateway_id,
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace)
        client.close()


# -- a deployed-like agent ------------------------------------------------------------------


class DeployedLikeAgent:
    """Speaks the protocol as PROTOCOL.md says deployed agents do, with their channel
    settings; records everything. No reconnect logic: tests drive each stream."""

    def __init__(
        self,
        target: str,
        vm_id: str,
        pool_id: str = "pool-a",
        *,
        org_id: str = "acme",
        version: str = "miglet/1.4.2",
        capabilities: Sequence[str] = (),
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        auto_ack: bool = True,
    ) -> None:
        self.target, self.vm_id, self.pool_id, self.org_id = target, vm_id, pool_id, org_id
        self.version = version
        self.capabilities = tuple(capabilities)
        self.token = token
        self.credentials = credentials
        self.options = [*DEPLOYED_OPTIONS, *OWN_CONNECTION, *options]
        self.auto_ack = auto_ack
        self.connect_ack: pb.ConnectAck | None = None
        self.commands: list[pb.Command] = []
        self.errors: list[pb.ErrorNotification] = []
        self.registrations: list[dict[str, Any]] = []
        self.status: grpc.StatusCode | None = None  # how the stream ended
        self.details = ""
        self.ended = asyncio.Event()
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def connect(self, timeout: float = 10.0) -> pb.ConnectAck | None:
        """Open the stream, send `connect`, wait for `connect_ack` (None: the call failed)."""
        if self.credentials is not None:
            self._channel = aio.secure_channel(self.target, self.credentials, self.options)
        else:
            self._channel = aio.insecure_channel(self.target, self.options)
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        self._call = pb_grpc.CommandServiceStub(self._channel).StreamCommands(metadata=metadata)
        hello = pb.ConnectRequest(
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            version=self.version,
            capabilities=self.capabilities,
        )
        try:
            await self._call.write(pb.MIGletMessage(connect=hello))
            first = await asyncio.wait_for(self._call.read(), timeout)
        except aio.AioRpcError as exc:
            self._ended(exc.code(), exc.details() or "")
            return None
        if first is aio.EOF:
            self._ended(await self._call.code(), await self._call.details())
            return None
        ack: pb.ConnectAck = first.connect_ack
        self.connect_ack = ack
        if not ack.accepted:  # a deployed agent stops here; see how the stream ends
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read(), timeout)
            return ack
        self._reader = asyncio.create_task(self._read())
        await self.heartbeat("ready")
        return ack

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is aio.EOF:
                    break
                kind = msg.WhichOneof("message")
                if kind == "command":
                    self.commands.append(msg.command)
                    if self.auto_ack:
                        self._spawn(self.run_command(msg.command))
                elif kind == "error":
                    self.errors.append(msg.error)
            self._ended(await self._call.code(), await self._call.details())
        except aio.AioRpcError as exc:
            self._ended(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            self._ended(grpc.StatusCode.CANCELLED, "agent stopped")
            raise

    def _ended(self, code: grpc.StatusCode, details: str) -> None:
        if not self.ended.is_set():
            self.status, self.details = code, details
            self.ended.set()

    async def run_command(self, cmd: pb.Command) -> None:
        """What a deployed agent does: register_runner reads exactly these keys."""
        if cmd.type == "register_runner":
            params = cmd.string_params
            self.registrations.append(
                {
                    "registration_token": params.get("registration_token", ""),
                    "runner_url": params.get("runner_url", ""),
                    "runner_group": params.get("runner_group", ""),
                    "labels": list(cmd.string_array_params),
                }
            )
            await self.heartbeat("registering_runner")
            await self.ack(cmd.id, True, "runner registered", runner_name=self.vm_id)
            await self.event(
                "runner_registered",
                runner_url=params.get("runner_url", ""),
                runner_group=params.get("runner_group", ""),
            )
            await self.heartbeat("idle")
        else:
            await self.ack(cmd.id, True, "ok")

    async def write(self, msg: pb.MIGletMessage) -> None:
        async with self._lock:
            await self._call.write(msg)

    async def heartbeat(self, state: str) -> None:
        beat = pb.Heartbeat(
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            miglet_state=state,
            runner_state=pb.RunnerState(state="offline" if state == "ready" else "idle"),
            timestamp=int(time.time()),
        )
        await self.write(pb.MIGletMessage(heartbeat=beat))

    async def event(self, type_: str, timestamp: int = 0, **data: str) -> None:
        ev = pb.EventNotification(
            type=type_,
            vm_id=self.vm_id,
            pool_id=self.pool_id,
            org_id=self.org_id,
            data=data,
            timestamp=timestamp or int(time.time()),
        )
        await self.write(pb.MIGletMessage(event=ev))

    async def ack(self, command_id: str, success: bool, message: str, **result: str) -> None:
        ack = pb.CommandAck(command_id=command_id, success=success, message=message, result=result)
        await self.write(pb.MIGletMessage(command_ack=ack))

    async def close(self, timeout: float = 10.0) -> None:
        """Half-close and wait for the gateway to end the stream, then drop the channel."""
        if self._call is not None and not self.ended.is_set():
            with contextlib.suppress(aio.AioRpcError, aio.UsageError):
                await self._call.done_writing()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), timeout)
        await self.drop()

    async def drop(self) -> None:
        """Vanish without a half-close (a VM losing its stream)."""
        for task in [self._reader, *self._tasks]:
            if task is not None:
                task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# -- TLS ------------------------------------------------------------------------------------


def make_certs(client_cn: str = "vm-1") -> dict[str, bytes]:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(cn: str, key: Any, issuer: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def pem_key(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("migctl-test-ca", ca_key, name("migctl-test-ca"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    server = builder("gateway", server_key, ca.subject).add_extension(san, critical=False)
    client = builder(client_cn, client_key, ca.subject)
    enc = serialization.Encoding.PEM
    return {
        "ca": ca.public_bytes(enc),
        "server_cert": server.sign(ca_key, hashes.SHA256()).public_bytes(enc),
        "server_key": pem_key(server_key),
        "client_cert": client.sign(ca_key, hashes.SHA256()).public_bytes(enc),
        "client_key": pem_key(client_key),
    }


# -- GCE identity tokens ----------------------------------------------------------------------


class IdentityIssuer:
    """Signs GCE-shaped instance identity tokens with a local RSA key, and serves its
    certificate as Google does (`{kid: x509 PEM}` JSON) from a local HTTP server that
    counts its fetches."""

    def __init__(self, max_age: int = 3600) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        from google.auth import crypt

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-google")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._signer = crypt.RSASigner.from_string(pem, key_id=self.kid)  # type: ignore[no-untyped-call]
        self.certs = {self.kid: cert.public_bytes(serialization.Encoding.PEM).decode()}
        self.max_age = max_age
        self.fetches = 0
        self._http: ThreadingHTTPServer | None = None

    def mint(
        self,
        instance_name: str,
        *,
        audience: str,
        project_id: str = "test-project",
        zone: str = "us-central1-a",
        lifetime: int = 3600,
        issued_at: float | None = None,
        issuer: str = "https://accounts.google.com",
    ) -> str:
        from google.auth import jwt

        iat = int(time.time() if issued_at is None else issued_at)
        payload = {
            "iss": issuer,
            "aud": audience,
            "azp": "1234567890",
            "jti": uuid.uuid4().hex,  # GCE mints a distinct token per request
            "sub": "1234567890",
            "iat": iat,
            "exp": iat + lifetime,
            "google": {
                "compute_engine": {
                    "instance_id": str(abs(hash(instance_name))),
                    "instance_name": instance_name,
                    "project_id": project_id,
                    "project_number": 123456789012,
                    "zone": zone,
                    "instance_creation_timestamp": iat - 600,
                }
            },
        }
        return bytes(jwt.encode(self._signer, payload)).decode()  # type: ignore[no-untyped-call]

    @property
    def certs_url(self) -> str:
        assert self._http is not None, "start() the certs server first"
        return f"http://127.0.0.1:{self._http.server_address[1]}/oauth2/v1/certs"

    def start(self) -> IdentityIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.fetches += 1
                body = json.dumps(issuer.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={issuer.max_age}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class GatewayProcess:
    """`migctl-grpc-gateway` as a process on its own config, on the same ports across
    restarts (kill -9, SIGTERM, start again)."""

    def __init__(
        self,
        workdir: Path,
        redis_url: str,
        pool_id: str = "pool-a",
        labels: Sequence[str] = (),
        port: int = 0,
        http_port: int = 0,
    ) -> None:
        self.port, self.http_port = port or free_port(), http_port or free_port()
        url = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
        endpoint = {"host": url["host"], "port": url["port"], "db": url.get("db", 0)}
        pool: dict[str, Any] = {"id": pool_id}
        if labels:
            pool["labels"] = list(labels)
        config = {
            "pool": pool,
            "vm_manager": {"provider": "sim"},
            "github_app": {"app_id": "1", "private_key": "unused by the gateway"},
            "pubsub": {"source": "local"},
            "redis": {"jobs": endpoint, "vm_status": endpoint},
            "server": {"bind": "127.0.0.1", "grpc_port": self.port, "http_port": self.http_port},
            "logging": {"level": "info", "format": "console"},
        }
        self.config = workdir / "controller.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLLER_")}
        exe = Path(sys.executable).parent / "migctl-grpc-gateway"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop_with(self, sig: int, timeout: float = 30) -> int:
        """Signal it and wait for its exit code (killed if it outlives `timeout`)."""
        self.signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return self.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
