"""The leak test (issue 5, "Secrets"): run the local stack through 20 jobs, then look for
every secret GitHub issued, and the App's private key, everywhere the controller writes:
its log files, every Redis key (name and value, by type), Celery's messages (kombu bodies
are base64 JSON: decoded) and results, and everything published on Redis pub/sub during
the run (Celery's task events: what Flower sees). Expected: zero hits.

The VM outbox legitimately holds a `register_runner` command (with its token) until the
agent acks it, and the GitHub token cache holds tokens encrypted; so Redis is searched
once the jobs are done and every outbox is empty: nothing may be left beyond its use.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState
from migctl.sim.github import FakeGitHub
from migctl.sim.stack import POOL, LocalStack, StackOptions
from migctl.worker.queues import KINDS, queue
from tests.helpers import require

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 20
JIT_ROUTE = "POST /orgs/{org}/actions/runners/generate-jitconfig"
REG_ROUTE = "POST /orgs/{org}/actions/runners/registration-token"
B64 = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")
MAX_DEPTH = 3


# -- what to look for -----------------------------------------------------------------------


@dataclass
class Secrets:
    """Every secret of the run, by kind; `add` keeps the ones issued mid-run (JIT configs are
    single use: the fake forgets them once a runner takes one)."""

    found: dict[bytes, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, value: str | bytes, kind: str) -> None:
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) >= 12:  # shorter would match by chance
            with self.lock:
                self.found.setdefault(raw, kind)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.found.values():
            out[kind] = out.get(kind, 0) + 1
        return out


def collect(fake: FakeGitHub, key_file: Path, secrets: Secrets) -> None:
    for item in fake.tokens():
        secrets.add(item["token"], f"{item['kind']} token")
    for nonce in fake.jit_configs():
        secrets.add(nonce, "JIT config nonce")
    pem = key_file.read_bytes()
    secrets.add(pem.strip(), "App private key (whole PEM)")
    for line in pem.splitlines():
        if not line.startswith(b"-----"):
            secrets.add(line.strip(), "App private key (a PEM line)")


def record_jit_configs(monkeypatch: pytest.MonkeyPatch, secrets: Secrets) -> None:
    """Keep every JIT config the fake hands out (encoded and its nonce) as it is issued."""
    original: Callable[..., Any] = FakeGitHub._jitconfig

    def recording(self: FakeGitHub, req: Any) -> Any:
        status, body, headers = original(self, req)
        if status == 201:
            encoded = body["encoded_jit_config"]
            secrets.add(encoded, "JIT config")
            secrets.add(json.loads(base64.b64decode(encoded))["nonce"], "JIT config nonce")
        return status, body, headers

    monkeypatch.setattr(FakeGitHub, "_jitconfig", recording)


# -- how to look ----------------------------------------------------------------------------


def views(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """`data`, and what it says once decoded: JSON strings (unescaped) and base64 runs."""
    yield data
    if depth >= MAX_DEPTH or not data:
        return
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict | list):
        for text in _strings(parsed):
            yield from views(text.encode(), depth + 1)
    for match in B64.finditer(data):
        chunk = match.group()
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded = decode(chunk + b"=" * (-len(chunk) % 4))
            except (binascii.Error, ValueError):
                continue
            if decoded:
                yield from views(decoded, depth + 1)


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)


@dataclass
class Hit:
    where: str
    kind: str
    secret: str  # its first characters, enough to find it again

    def __str__(self) -> str:
        return f"{self.kind} {self.secret}... in {self.where}"


def search(where: str, data: bytes, secrets: Secrets, hits: list[Hit]) -> None:
    with secrets.lock:
        wanted = dict(secrets.found)
    seen: set[bytes] = set()
    for view in views(data):
        for secret, kind in wanted.items():
            if secret not in seen and secret in view:
                seen.add(secret)
                hits.append(Hit(where, kind, secret[:8].decode(errors="replace")))


def redis_items(client: redis.Redis) -> Iterator[tuple[str, bytes]]:
    """Every key of the server: its name, then its contents as the type's commands return
    them, then its DUMP. Keys that expire while scanned are skipped."""
    r: Any = client  # redis-py types every reply as bytes | str; this client answers bytes
    for key in r.scan_iter(count=1000):
        name = key.decode(errors="replace")
        yield f"Redis key name {name!r}", key
        kind = r.type(key).decode()
        parts: list[bytes]
        if kind == "string":
            parts = [r.get(key) or b""]
        elif kind == "hash":
            parts = [b for kv in r.hgetall(key).items() for b in kv]
        elif kind == "list":
            parts = r.lrange(key, 0, -1)
        elif kind == "set":
            parts = list(r.smembers(key))
        elif kind == "zset":
            parts = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [
                b for _id, entry in r.xrange(key, "-", "+") for kv in entry.items() for b in kv
            ]
        else:
            parts = []
        for i, part in enumerate(parts):
            yield f"Redis {kind} {name!r} item {i}", part
        dumped = r.dump(key)
        if dumped:
            yield f"Redis DUMP of {name!r}", dumped


class PubSubTap:
    """Everything published on the server while the run lasts (Celery's events, wake-ups).

    Also the control: with keyspace notifications on, each write to a VM's command hash is
    read back at once, so the `register_runner` commands in flight are seen (with their
    secret) before the agent acks them; they show that the secrets searched for are the
    ones that really flowed, and where the search must find them while they are in use."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.reader: Any = redis.Redis.from_url(url)  # replies are bytes
        self.reader.config_set("notify-keyspace-events", "Kh")
        self.messages: list[tuple[str, bytes]] = []
        self.commands: set[bytes] = set()
        self._stop = threading.Event()
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("*")
        self._thread = threading.Thread(target=self._run, name="pubsub-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if not message or not isinstance(message.get("data"), bytes):
                continue
            channel = message["channel"].decode(errors="replace")
            if channel.startswith("__keyspace@"):
                key = channel.split(":", 1)[1]
                if ":cmds:" in key and message["data"] == b"hset":
                    self.commands.update(self.reader.hvals(key))
                continue
            self.messages.append((channel, message["data"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self.client.close()
        self.reader.close()


class QueueTap:
    """Celery's messages in flight, sampled through the run: queued and unacked. Task
    arguments must never hold a secret, not even for a moment."""

    def __init__(self, url: str) -> None:
        self.client: Any = redis.Redis.from_url(url)  # replies are bytes
        self.messages: dict[bytes, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        names = [queue(POOL, kind) for kind in KINDS]
        while not self._stop.is_set():
            try:
                for name in names:
                    for raw in self.client.lrange(name, 0, -1):
                        self.messages.setdefault(raw, f"Celery queue {name}")
                for raw in self.client.hvals("unacked"):
                    self.messages.setdefault(raw, "Celery unacked hash")
            except redis.RedisError:
                pass
            self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


# -- the run ----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in dead)
            pytest.fail(f"process(es) died while waiting for {what}: {dead}\n{logs}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def outboxes_empty(client: redis.Redis) -> bool:
    prefix = f"migctl:{{{POOL}}}:"
    return not any(
        client.exists(key)
        for pattern in ("outbox:*", "cmds:*")
        for key in client.scan_iter(prefix + pattern)
    )


@pytest.mark.parametrize("mode", ["registration-token", "jit"])
def test_no_secret_is_left_in_logs_redis_or_celery_after_20_jobs(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    secrets = Secrets()
    record_jit_configs(monkeypatch, secrets)
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway", "flower"),
            concurrency=4,
            min_ready_vms=2,
            max_vms=8,
            job_duration=0.3,
            create_s=1.0,
            heartbeat_interval=1.0,
            log_level="debug",
        ),
        workdir=tmp_path,
    )
    taps: list[Any] = []
    try:
        stack.start()
        if mode == "jit":
            # Before any VM is RUNNING (create_s): every agent of the run advertises it.
            stack.fleet.capabilities = ("jit",)
        taps = [PubSubTap(stack.redis_url), QueueTap(stack.redis_url)]
        assert stack.github is not None
        store = RedisStore(stack.redis, POOL)
        ids = stack.submit(JOBS)

        def all_done() -> bool:
            jobs = store.get_jobs(ids)
            return len(jobs) == JOBS and all(job.state.terminal for job, _ in jobs)

        wait_for(all_done, 240, f"{JOBS} jobs to finish", stack)
        states = [job.state for job, _ in store.get_jobs(ids)]
        assert states == [JobState.COMPLETED] * JOBS
        calls = stack.github.calls
        if mode == "jit":
            assert calls[JIT_ROUTE] >= JOBS and calls[REG_ROUTE] == 0, dict(calls)
            assert all("jit" in vm.capabilities for vm, _ in store.get_vms())
        else:
            assert calls[REG_ROUTE] >= 1 and calls[JIT_ROUTE] == 0, dict(calls)

        # Nothing beyond its use: every register_runner was acked and dropped.
        wait_for(lambda: outboxes_empty(stack.redis), 30, "every VM outbox to empty", stack)
        collect(stack.github, stack.workdir / "github-app-key.pem", secrets)
        kinds = secrets.kinds()
        assert kinds.get("installation token", 0) >= 1
        assert kinds.get("JIT config" if mode == "jit" else "registration token", 0) >= 1
        assert kinds.get("App private key (a PEM line)", 0) >= 20

        hits: list[Hit] = []
        scanned = {"redis items": 0, "celery messages": 0, "pubsub messages": 0, "files": 0}
        for where, data in redis_items(stack.redis):
            scanned["redis items"] += 1
            search(where, data, secrets, hits)
        for tap in taps:
            tap.close()
        pubsub, celery = taps
        taps = []
        for channel, data in pubsub.messages:
            scanned["pubsub messages"] += 1
            search(f"pub/sub message on {channel!r}", data, secrets, hits)
        for raw, where in celery.messages.items():
            scanned["celery messages"] += 1
            body = json.loads(raw)
            message = body[0] if isinstance(body, list) else body  # unacked: [msg, exch, rk]
            task = message.get("headers", {}).get("task", "?")
            search(f"{where}, task {task}", raw, secrets, hits)
        assert scanned["celery messages"] > JOBS  # the tap saw the run's tasks
        assert scanned["pubsub messages"] > JOBS  # and Celery's task events
        # The control: each register_runner seen in flight held a secret the search knows.
        wanted = "JIT config" if mode == "jit" else "registration token"
        registrations = [c for c in pubsub.commands if b"register_runner" in c]
        assert registrations, "the control saw no register_runner in flight"
        for command in registrations:
            control: list[Hit] = []
            search("a register_runner in flight", command, secrets, control)
            assert any(hit.kind == wanted for hit in control), command[:200]
        scanned["registrations seen in flight"] = len(registrations)

        # What people look at: Flower's API (tasks with their args, kwargs and results,
        # workers), the status page and every API it reads, /stats and /metrics.
        for where, data in operator_pages(stack, store, ids):
            scanned["pages"] = scanned.get("pages", 0) + 1
            search(where, data, secrets, hits)
        assert scanned["pages"] >= JOBS + 8

        for name in list(stack.procs):
            stack.stop_process(name)  # logs complete, flushed
        log_lines = 0
        for path in sorted(stack.workdir.rglob("*")):
            if path.is_file() and path.name != "github-app-key.pem":
                scanned["files"] += 1
                data = path.read_bytes()
                log_lines += data.count(b"\n")
                search(f"file {path.name}", data, secrets, hits)
        assert (stack.workdir / "worker.log").stat().st_size > 0
        scanned["log lines"] = log_lines

        print(f"\n{mode}: searched {scanned} for {kinds}")
        assert not hits, "secrets leaked:\n" + "\n".join(sorted({str(h) for h in hits}))
    finally:
        for tap in taps:
            tap.close()
        stack.stop()


def operator_pages(
    stack: LocalStack, store: RedisStore, ids: list[str]
) -> Iterator[tuple[str, bytes]]:
    http = f"http://127.0.0.1:{stack.ports['http']}"
    paths = ["/", "/static/status.js", "/stats", "/metrics"]
    paths += [f"/api/v1/pools/{POOL}/{what}" for what in ("stats", "vms", "jobs", "deadletters")]
    paths += [f"/api/v1/vms/{vm.id}" for vm, _ in store.get_vms()]
    paths += [f"/api/v1/jobs/{job_id}" for job_id in ids]
    for path in paths:
        resp = requests.get(http + path, timeout=10)
        assert resp.status_code == 200, (path, resp.status_code)
        yield f"HTTP {path}", resp.content
    flower = f"http://127.0.0.1:{stack.ports['flower']}"
    auth = ("admin", "local-only")
    deadline = time.monotonic() + 60
    while True:  # Flower learns the tasks from the workers' events
        try:
            tasks = requests.get(f"{flower}/api/tasks", auth=auth, timeout=10)
            if tasks.status_code == 200 and len(tasks.json()) >= JOBS:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "Flower never listed the run's tasks"
        time.sleep(1)
    yield "Flower /api/tasks", tasks.content
    for task_id in list(tasks.json())[:200]:
        info = requests.get(f"{flower}/api/task/info/{task_id}", auth=auth, timeout=10)
        yield f"Flower task {task_id}", info.content
    workers = requests.get(f"{flower}/api/workers", auth=auth, timeout=30)
    yield "Flower /api/workers", workers.content


def test_the_search_finds_secrets_wherever_they_are_planted(redis_url: str, tmp_path: Path) -> None:
    """The control for the search itself: one planted secret per place and encoding."""
    secrets = Secrets()
    plants = {
        kind: f"{kind[:3].upper()}{i:02d}-SECRET-{'x' * 16}"
        for i, kind in enumerate(
            ["string", "hash", "list", "set", "zset", "stream", "keyname", "kombu", "file", "json"]
        )
    }
    for kind, value in plants.items():
        secrets.add(value, kind)
    client = redis.Redis.from_url(redis_url)
    client.set("a", f"prefix {plants['string']} suffix")
    client.hset("b", "field", plants["hash"])
    client.rpush("c", "x", plants["list"])
    client.sadd("d", plants["set"])
    client.zadd("e", {plants["zset"]: 1.0})
    client.xadd("f", {"data": plants["stream"]})
    client.set(f"g:{plants['keyname']}", "1")
    args = json.dumps([[plants["kombu"]], {}, {}]).encode()
    message = {"body": base64.b64encode(args).decode(), "headers": {"task": "t"}}
    client.rpush("celery", json.dumps(message))
    escaped = plants["json"].replace("-", "\\u002d")  # JSON's own escape of "-"
    client.set("h", '{"note": "' + escaped + '"}')
    hits: list[Hit] = []
    for where, data in redis_items(client):
        search(where, data, secrets, hits)
    client.close()
    log = tmp_path / "worker.log"
    log.write_text(f"INFO something {plants['file']} happened\n")
    search("file worker.log", log.read_bytes(), secrets, hits)
    assert {h.kind for h in hits} == set(plants)
    assert any(h.where == "Redis list 'celery' item 0" and h.kind == "kombu" for h in hits)
