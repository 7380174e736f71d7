"""The local world, started for `migctl up` and the end-to-end tests.

Real parts where the product has them: a real redis-server, the Pub/Sub emulator (or the
local Redis job source when it is not installed), and the Procfile's processes as
subprocesses with a generated config. Simulated: the MIG (in Redis), the MIGlet agents
(real gRPC, in this process) and GitHub (an HTTP fake that checks JWT signatures).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis
import yaml

from migctl.bridge.local_source import publish_local
from migctl.sim.github import FakeGitHub
from migctl.sim.keys import generate_app_key

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("bridge", "worker", "beat", "gateway", "flower")
APP_ID = "424242"
ORG = "local-org"
PROJECT = "migctl-local"
TOPIC = "jobs"
SUBSCRIPTION = "jobs-local-sub"
DEAD_LETTER_TOPIC = "jobs-dead"
POOL = "pool-local"
LABELS = ["self-hosted", "linux", "x64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def procfile(path: Path | None = None) -> dict[str, str]:
    """The Procfile's processes: name -> command."""
    text = (path or ROOT / "Procfile").read_text() if (path or ROOT / "Procfile").exists() else ""
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            name, _, cmd = line.partition(":")
            out[name.strip()] = cmd.strip()
    if not out:  # installed without the repository: the same five commands
        out = {
            "bridge": "migctl-bridge",
            "worker": "celery -A migctl worker -E --loglevel INFO",
            "beat": "celery -A migctl beat --loglevel INFO",
            "gateway": "migctl-grpc-gateway",
            "flower": "celery -A migctl flower",
        }
    return out


class RedisServer:
    """An embedded redis-server on a free port, in its own directory."""

    def __init__(self, workdir: Path, port: int = 0, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed: install it (apt-get install redis-server) "
                "or point migctl at a Redis with --redis redis://HOST:PORT/DB"
            )
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "everysec"]
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class StackOptions:
    redis_url: str = ""  # empty: start an embedded redis-server
    use_emulator: bool | None = None  # None: when installed
    processes: tuple[str, ...] = PROCESSES
    workers: int = 1
    concurrency: int = 2
    min_ready_vms: int = 1
    max_vms: int = 10
    idle_timeout: float = 60.0
    job_duration: float = 2.0
    create_s: float = 3.0
    heartbeat_interval: float = 2.0
    visibility_timeout: float = 30.0
    log_level: str = "warning"
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    kind_env: dict[str, dict[str, str]] = field(default_factory=dict)  # e.g. {"worker": {...}}
    capabilities: tuple[str, ...] = ()  # what the simulated agents advertise, e.g. ("jit",)
    agent_options: dict[str, Any] = field(default_factory=dict)  # e.g. duplicate_events=True
    publish_copies: int = 1  # >1: every job message is published that many times (fault tests)
    lost_runner_timeout: float = 5.0  # fake GitHub fails a job whose runner went silent
    separate_mig: bool = False  # the simulated MIG in its own redis-server (FLUSHALL tests)


class LocalStack:
    def __init__(self, options: StackOptions | None = None, workdir: Path | None = None) -> None:
        self.o = options or StackOptions()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="migctl-up-"))
        self.redis_server: RedisServer | None = None
        self.mig_redis_server: RedisServer | None = None
        self.redis_url = self.o.redis_url
        self.github: FakeGitHub | None = None
        self.emulator: Any = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config_path = self.workdir / "controller.yaml"
        self.ports: dict[str, int] = {}
        self._fleet_thread: threading.Thread | None = None
        self._fleet_loop: asyncio.AbstractEventLoop | None = None
        self._fleet_stop: asyncio.Event | None = None
        self.fleet: Any = None
        self._publisher: Any = None
        self._sub_path = ""
        self.emulator_host = ""

    # -- start -------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if not self.redis_url:
            self.redis_server = RedisServer(self.workdir).start()
            self.redis_url = self.redis_server.url
        self.redis = redis.Redis.from_url(self.redis_url)
        self.mig_redis_url = self.redis_url
        if self.o.separate_mig:
            (self.workdir / "mig-redis").mkdir(exist_ok=True)
            self.mig_redis_server = RedisServer(self.workdir / "mig-redis").start()
            self.mig_redis_url = self.mig_redis_server.url
        self.mig_redis = redis.Redis.from_url(self.mig_redis_url)
        private_pem, public_pem = generate_app_key()
        key_path = self.workdir / "github-app-key.pem"
        key_path.write_bytes(private_pem)
        key_path.chmod(0o600)
        self.github = FakeGitHub(
            APP_ID,
            public_pem,
            on_event=self._on_github_event,
            lost_runner_timeout=self.o.lost_runner_timeout,
        ).start()
        use_emulator = self.o.use_emulator
        if use_emulator is None:
            from migctl.sim.pubsub_emulator import find_emulator

            use_emulator = find_emulator() is not None and shutil.which("java") is not None
        if use_emulator:
            from migctl.sim.pubsub_emulator import (
                Emulator,
                ensure_topic_and_subscription,
                publisher_client,
            )

            self.emulator = Emulator().start()
            self.emulator_host = self.emulator.host
            ensure_topic_and_subscription(self.emulator_host, PROJECT, TOPIC, SUBSCRIPTION)
            ensure_topic_and_subscription(
                self.emulator_host, PROJECT, DEAD_LETTER_TOPIC, "jobs-dead-sub"
            )
            self._publisher = publisher_client(self.emulator_host)
        self.ports = {"grpc": free_port(), "http": free_port(), "flower": free_port()}
        self.config_path.write_text(yaml.safe_dump(self._config(key_path), sort_keys=False))
        for name in self.o.processes:
            if name == "worker":
                for i in range(self.o.workers):
                    self._spawn(f"worker{i + 1}" if self.o.workers > 1 else "worker", "worker")
            else:
                self._spawn(name, name)
        self._start_fleet()

    def _config(self, key_path: Path) -> dict[str, Any]:
        url = urlparse(self.redis_url)
        endpoint: dict[str, Any] = {
            "host": url.hostname or "127.0.0.1",
            "port": url.port or 6379,
            "db": int(url.path.strip("/") or 0),
        }
        if url.password:
            endpoint["password"] = url.password
        cfg: dict[str, Any] = {
            "pool": {"id": POOL, "labels": LABELS},
            "scheduler": {
                "poll_interval": "1s",
                "assignment_timeout": "60s",
                "max_concurrent_assignments": 50,
            },
            "vm_manager": {
                "provider": "sim",
                "poll_interval": "2s",
                "heartbeat_timeout": "20s",
                "min_ready_vms": self.o.min_ready_vms,
                "max_vms": self.o.max_vms,
                "idle_timeout": f"{self.o.idle_timeout}s",
                "max_scale_up_per_minute": max(self.o.max_vms, 5),
            },
            "github_app": {
                "app_id": APP_ID,
                "private_key_path": str(key_path),
                "base_url": self.github.url if self.github else "",
                "web_url": "https://github.com",
                "org": ORG,
                "installation_id": 1,
            },
            "redis": {"jobs": endpoint, "vm_status": endpoint},
            "pubsub": {
                "project_id": PROJECT,
                "subscription": SUBSCRIPTION,
                "topic": TOPIC,
                "source": "pubsub" if self.emulator else "local",
                "emulator_host": self.emulator_host,
                "dead_letter_topic": DEAD_LETTER_TOPIC if self.emulator else "",
            },
            "server": {
                "grpc_port": self.ports["grpc"],
                "http_port": self.ports["http"],
                "bind": "127.0.0.1",
            },
            "logging": {"level": self.o.log_level, "format": "console"},
            "sim": {
                "create_s": self.o.create_s,
                "heartbeat_interval": self.o.heartbeat_interval,
                "job_duration": self.o.job_duration,
                "redis_url": self.mig_redis_url if self.o.separate_mig else "",
            },
        }
        for path, value in self.o.extra.items():
            node = cfg
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return cfg

    def env(self, kind: str = "") -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONTROLLER_", "GITHUB_APP", "REDIS_", "PUBSUB_"))
        }
        env.update(
            MIGCTL_CONFIG=str(self.config_path),
            MIGCTL_VISIBILITY_TIMEOUT=str(self.o.visibility_timeout),
            FLOWER_PORT=str(self.ports.get("flower", 5555)),
            FLOWER_ADDRESS="127.0.0.1",
            FLOWER_BASIC_AUTH="admin:local-only",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.o.env)
        env.update(self.o.kind_env.get(kind, {}))
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def _spawn(self, name: str, kind: str) -> None:
        cmd = shlex.split(procfile()[kind])
        if kind == "worker":
            cmd += ["--concurrency", str(self.o.concurrency), "--hostname", f"{name}@%h"]
        if kind == "beat":
            cmd += ["--schedule", str(self.workdir / "celerybeat-schedule")]
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            cmd,
            env=self.env(kind),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )

    def _start_fleet(self) -> None:
        from migctl.sim.fleet import Fleet
        from migctl.sim.mig import SimMig

        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._fleet_loop = loop
            asyncio.set_event_loop(loop)
            self._fleet_stop = asyncio.Event()
            mig = SimMig(redis.Redis.from_url(self.mig_redis_url), POOL)
            assert self.github is not None
            self.fleet = Fleet(
                mig,
                POOL,
                ORG,
                f"127.0.0.1:{self.ports['grpc']}",
                self.github.url,
                heartbeat_interval=self.o.heartbeat_interval,
                capabilities=self.o.capabilities,
                agent_options=self.o.agent_options,
            )
            ready.set()
            loop.run_until_complete(self.fleet.run(self._fleet_stop))
            # gRPC leaves status-watching tasks behind its cancelled calls: finish them
            # before closing the loop, or they are reported as destroyed while pending.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._fleet_thread = threading.Thread(target=run, name="fleet", daemon=True)
        self._fleet_thread.start()
        ready.wait(10)

    # -- the job source ----------------------------------------------------------------------

    def _on_github_event(self, payload: dict[str, Any]) -> None:
        """GitHub's webhook deliveries, as the Go world's pipeline would publish them."""
        if payload.get("action") == "queued":
            wj = payload["workflow_job"]
            message = {
                "org_id": str(payload.get("organization", {}).get("id", 1)),
                "org_name": payload.get("organization", {}).get("login", ORG),
                "installation_id": payload.get("installation", {}).get("id", 1),
                "repo_full_name": payload["repository"]["full_name"],
                "run_id": wj["run_id"],
                "job_id": wj["id"],
                "labels": wj["labels"],
                "pool_id": POOL,
                "priority": 0,
                "received_at": time.time(),
            }
            self.publish(json.dumps(message).encode(), {})
        else:
            self.publish(json.dumps(payload).encode(), {"X-GitHub-Event": "workflow_job"})

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        for _ in range(max(1, self.o.publish_copies)):
            self._publish_once(data, attributes)

    def _publish_once(self, data: bytes, attributes: dict[str, str]) -> None:
        if self._publisher is not None:
            topic = self._publisher.topic_path(PROJECT, TOPIC)
            self._publisher.publish(topic, data, **attributes).result(timeout=30)
        else:
            publish_local(self.redis, POOL, data, attributes)

    def submit(
        self,
        count: int = 1,
        labels: list[str] | None = None,
        duration: float | None = None,
        repo: str = f"{ORG}/demo",
        conclusion: str = "success",
    ) -> list[str]:
        assert self.github is not None
        ids = []
        for _ in range(count):
            job = self.github.add_job(
                repo,
                labels or LABELS,
                org=ORG,
                duration=self.o.job_duration if duration is None else duration,
                conclusion=conclusion,
            )
            ids.append(job["job_id"])
        return ids

    # -- observation ---------------------------------------------------------------------------

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    # -- stop --------------------------------------------------------------------------------

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        if self._fleet_loop is not None and self._fleet_stop is not None:
            self._fleet_loop.call_soon_threadsafe(self._fleet_stop.set)
            if self._fleet_thread:
                self._fleet_thread.join(10)
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in list(self.procs):
            self.stop_process(name)
        if self._publisher is not None:
            try:
                self._publisher.stop()
            except Exception:
                pass
        if self.emulator is not None:
            self.emulator.stop()
        if self.github is not None:
            self.github.stop()
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.mig_redis_server is not None:
            self.mig_redis_server.stop()
