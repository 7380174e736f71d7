"""The webhook ingress over real HTTP, with the real Redis ledger, into the official Pub/Sub
emulator and the local source, and `migctl-webhook` as a process (latency measured)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import requests
import yaml

from migctl.bridge.local_source import LocalSource, intake_key
from migctl.bridge.messages import parse
from migctl.bridge.testing import MemoryIntake
from migctl.sim.pubsub_emulator import (
    Emulator,
    ensure_topic_and_subscription,
    find_emulator,
    publisher_client,
    subscriber_client,
)
from migctl.sim.stack import free_port
from migctl.webhook.ingress import Ingress
from migctl.webhook.ledger import DELIVERY_TTL_S, RedisLedger
from migctl.webhook.ports import Ledger, Publisher
from migctl.webhook.publishers import PUBLISH_TIMEOUT_S, LocalPublisher, PubsubPublisher
from migctl.webhook.server import MAX_BODY, WebhookServer
from migctl.webhook.signature import sign
from migctl.webhook.testing import MemoryLedger, MemoryPublisher
from tests.helpers import require

pytestmark = pytest.mark.integration

POOL = "pool-hook"
PROJECT = "migctl-hook"
SECRET = b"It's a Secret to Everybody"
VECTOR = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
GITHUB_LIMIT_S = 10.0  # GitHub marks a delivery failed without a 2xx within 10 s
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0


def workflow_job(job_id: int, action: str = "queued") -> bytes:
    """A `workflow_job` payload spelled as GitHub sends it (indented, its own key order)."""
    body = {
        "action": action,
        "workflow_job": {
            "id": job_id,
            "run_id": 555,
            "run_attempt": 1,
            "status": "queued",
            "conclusion": None,
            "labels": ["self-hosted", "linux"],
            "runner_id": None,
            "runner_name": None,
            "created_at": "2027-01-15T10:00:00Z",
        },
        "repository": {"id": 1, "full_name": "acme/api"},
        "organization": {"login": "acme"},
        "installation": {"id": 4242},
        "sender": {"login": "octocat"},
    }
    return json.dumps(body, indent=2).encode()


def github_headers(
    body: bytes, event: str = "workflow_job", delivery: str | None = None, secret: bytes = SECRET
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/abc123",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "42",
        "X-Hub-Signature-256": sign(secret, body),
    }


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def raw_request(port: int, head: bytes, body: bytes = b"", read_timeout: float = 5.0) -> bytes:
    """Send bytes as they are; return what the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def ledger(r: redis.Redis) -> RedisLedger:
    return RedisLedger(r, POOL)


@pytest.fixture
def serve() -> Iterator[Callable[..., WebhookServer]]:
    servers: list[WebhookServer] = []

    def start(publisher: Publisher, ledger: Ledger, **kw: Any) -> WebhookServer:
        server = WebhookServer(("127.0.0.1", 0), Ingress(SECRET, publisher, ledger), **kw)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=2)


def url(server: WebhookServer, path: str = "/webhook") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


# -- the HTTP ingress -------------------------------------------------------------------------


def test_githubs_documented_vector_is_accepted(
    serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger)
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "workflow_job",
        "X-GitHub-Delivery": "d-1",
        "X-Hub-Signature-256": VECTOR,  # the docs' literal value, not computed here
    }
    resp = requests.post(url(server, "/"), data=b"Hello, World!", headers=headers, timeout=WAIT)
    assert resp.status_code == 202, resp.text
    assert resp.json()["outcome"] == "accepted"
    assert publisher.messages == [
        (b"Hello, World!", {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": "d-1"})
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: h.pop("X-Hub-Signature-256"), "missing_signature"),
        (lambda h: h.update({"X-Hub-Signature-256": sign(b"wrong", b"{}")}), "bad_signature"),
        (lambda h: h.update({"X-Hub-Signature-256": "sha256=nothex"}), "bad_signature"),
        (lambda h: h.update({"X-Hub-Signature-256": VECTOR}), "bad_signature"),  # other body
    ],
    ids=["missing", "other-secret", "malformed", "other-body"],
)
def test_missing_and_bad_signatures_are_401(
    serve: Callable[..., WebhookServer],
    ledger: RedisLedger,
    change: Callable[[dict[str, str]], Any],
    reason: str,
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger)
    body = workflow_job(1)
    headers = github_headers(body)
    change(headers)
    resp = requests.post(url(server), data=body, headers=headers, timeout=WAIT)
    assert resp.status_code == 401
    assert resp.json()["reason"] == reason and resp.json()["detail"]
    assert publisher.messages == []
    assert ledger.counters() == {"received": 1, f"refused:{reason}": 1}


@pytest.mark.parametrize("event", ["push", "ping", "workflow_run"])
def test_other_events_are_ignored_with_202(
    serve: Callable[..., WebhookServer], ledger: RedisLedger, event: str
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger)
    body = b'{"zen": "Design for failure."}'
    resp = requests.post(url(server), data=body, headers=github_headers(body, event), timeout=WAIT)
    assert (resp.status_code, resp.json()["outcome"]) == (202, "ignored")
    assert publisher.messages == []


def test_a_duplicate_delivery_id_is_published_once(
    serve: Callable[..., WebhookServer], ledger: RedisLedger, r: redis.Redis
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger)
    body = workflow_job(7)
    headers = github_headers(body, delivery="5f3e0c2a-0000-4000-8000-000000000001")
    outcomes = []
    for _ in range(3):
        resp = requests.post(url(server), data=body, headers=headers, timeout=WAIT)
        assert resp.status_code == 202
        outcomes.append(resp.json()["outcome"])
    assert outcomes == ["accepted", "duplicate", "duplicate"]
    assert len(publisher.messages) == 1
    key = f"migctl:{{{POOL}}}:webhook:delivery:5f3e0c2a-0000-4000-8000-000000000001"
    assert 0 < r.ttl(key) <= DELIVERY_TTL_S
    assert ledger.counters() == {"received": 3, "accepted": 1, "duplicates": 2}


def test_concurrent_copies_of_one_delivery(
    serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    """Copies racing each other may each be published (the bridge dedupes on the job);
    every later copy is a duplicate."""
    publisher = MemoryPublisher(delay_s=0.05)
    server = serve(publisher, ledger)
    body = workflow_job(8)
    headers = github_headers(body)
    answers: list[int] = []

    def post() -> None:
        answers.append(
            requests.post(url(server), data=body, headers=headers, timeout=WAIT).status_code
        )

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert answers == [202] * 8
    published = len(publisher.messages)
    assert 1 <= published <= 8
    resp = requests.post(url(server), data=body, headers=headers, timeout=WAIT)
    assert resp.json()["outcome"] == "duplicate"
    assert len(publisher.messages) == published


def test_an_oversized_body_is_413_unread_and_the_server_stays_up(
    serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    publisher = MemoryPublisher(max_bytes=MAX_BODY)
    server = serve(publisher, ledger)
    # Only the head is sent: the answer must come without the server reading a body.
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-GitHub-Event: workflow_job\r\nX-GitHub-Delivery: big-1\r\n"
        + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    )
    answer = raw_request(server.port, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"reason": "too_large"' in answer

    # A client that sends the whole 26 MB anyway still reads the 413 (the rest is discarded).
    big = b"x" * (MAX_BODY + 1024 * 1024)
    resp = requests.post(url(server), data=big, headers=github_headers(big), timeout=WAIT)
    assert resp.status_code == 413 and resp.json()["reason"] == "too_large"

    # curl-style Expect: 100-continue gets the 413 before any body is sent.
    answer = raw_request(
        server.port, head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]

    # Exactly the limit is read and published.
    exact = b"{" + b" " * (MAX_BODY - 2) + b"}"
    resp = requests.post(url(server), data=exact, headers=github_headers(exact), timeout=WAIT)
    assert (resp.status_code, resp.json()["outcome"]) == (202, "accepted")

    assert requests.get(url(server, "/health"), timeout=WAIT).json() == {"status": "ok"}
    body = workflow_job(9)
    resp = requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
    assert resp.status_code == 202
    assert len(publisher.messages) == 2
    assert ledger.counters()["refused:too_large"] == 3


def test_length_required_and_a_stalled_client_is_cut_off(
    serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger, read_timeout_s=0.5)
    chunked = b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw_request(server.port, chunked).startswith(b"HTTP/1.1 411 ")

    stalled = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = raw_request(server.port, stalled, b'{"action":')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]  # the server's read deadline
    body = workflow_job(10)
    resp = requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
    assert resp.status_code == 202 and len(publisher.messages) == 1


def test_a_failed_publish_is_503_not_deduped_and_redelivery_works(
    serve: Callable[..., WebhookServer], ledger: RedisLedger, r: redis.Redis
) -> None:
    publisher = MemoryPublisher()
    server = serve(publisher, ledger)
    body = workflow_job(11)
    headers = github_headers(body, delivery="redeliver-me")
    publisher.fail(1)
    resp = requests.post(url(server), data=body, headers=headers, timeout=WAIT)
    assert (resp.status_code, resp.json()["reason"]) == (503, "publish_failed")
    assert not r.exists(f"migctl:{{{POOL}}}:webhook:delivery:redeliver-me")
    resp = requests.post(url(server), data=body, headers=headers, timeout=WAIT)
    assert (resp.status_code, resp.json()["outcome"]) == (202, "accepted")
    assert len(publisher.messages) == 1
    assert ledger.counters() == {"received": 2, "refused:publish_failed": 1, "accepted": 1}


def test_an_unreachable_topic_is_503_well_inside_githubs_limit(
    serve: Callable[..., WebhookServer],
) -> None:
    port = free_port()  # nothing listens there
    client = publisher_client(f"127.0.0.1:{port}")
    publisher = PubsubPublisher(client, client.topic_path(PROJECT, "jobs"))
    try:
        server = serve(publisher, MemoryLedger())
        body = workflow_job(12)
        resp = requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
    finally:
        publisher.close()
    assert (resp.status_code, resp.json()["reason"]) == (503, "publish_failed")
    # The publisher gives up by its own timeout, configured well inside GitHub's 10 s
    # (no wall-clock assertion: these machines are shared and noisy).
    assert PUBLISH_TIMEOUT_S + 1 < GITHUB_LIMIT_S - 4


class BrokenPublisher:
    max_bytes = 1024

    def publish(self, data: bytes, attributes: Any) -> str:
        raise ValueError("a bug")


def test_a_bug_in_a_port_is_a_500_and_the_server_goes_on(
    serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    server = serve(BrokenPublisher(), ledger)
    body = workflow_job(17)
    resp = requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
    assert (resp.status_code, resp.json()["reason"]) == (500, "internal_error")
    assert requests.get(url(server, "/health"), timeout=WAIT).status_code == 200


def test_redis_down_still_publishes(serve: Callable[..., WebhookServer], tmp_path: Path) -> None:
    from migctl.sim.stack import RedisServer
    from migctl.webhook.main import webhook_redis

    server_ = RedisServer(tmp_path).start()
    try:
        endpoint = {"host": "127.0.0.1", "port": server_.port}
        from migctl.settings import Settings

        settings = Settings(
            pool={"id": POOL},
            vm_manager={"provider": "sim"},
            github_app={"app_id": "1", "private_key": "x"},
            redis={"jobs": endpoint, "vm_status": endpoint},
            pubsub={"project_id": PROJECT, "subscription": "s", "topic": "t"},
        )
        ledger = RedisLedger(webhook_redis(settings), POOL)
        publisher = MemoryPublisher()
        server = serve(publisher, ledger)
        server_.stop()
        body = workflow_job(13)
        resp = requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
        assert (resp.status_code, resp.json()["outcome"]) == (202, "accepted")
        assert len(publisher.messages) == 1
        assert requests.get(url(server, "/stats"), timeout=WAIT).status_code == 503
    finally:
        server_.stop()


def test_unknown_paths_and_stats(serve: Callable[..., WebhookServer], ledger: RedisLedger) -> None:
    server = serve(MemoryPublisher(), ledger)
    assert requests.post(url(server, "/hooks"), data=b"{}", timeout=WAIT).status_code == 404
    assert requests.get(url(server, "/nope"), timeout=WAIT).status_code == 404
    body = workflow_job(14)
    requests.post(url(server), data=body, headers=github_headers(body), timeout=WAIT)
    stats = requests.get(url(server, "/stats"), timeout=WAIT).json()
    assert stats == {"counters": {"received": 1, "accepted": 1}}


# -- into the job sources -------------------------------------------------------------------


def test_into_the_local_source(
    serve: Callable[..., WebhookServer], ledger: RedisLedger, r: redis.Redis
) -> None:
    server = serve(LocalPublisher(r, POOL), ledger)
    body = workflow_job(15)
    resp = requests.post(url(server), data=body, headers=github_headers(body, delivery="loc-1"))
    assert resp.status_code == 202
    envelope = json.loads(r.lindex(intake_key(POOL), 0) or b"{}")
    assert base64.b64decode(envelope["data"]) == body
    assert envelope["attributes"] == {
        "X-GitHub-Event": "workflow_job",
        "X-GitHub-Delivery": "loc-1",
    }

    intake = MemoryIntake()
    source = LocalSource(r, POOL, intake, POOL, block_seconds=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "15" in intake.jobs, "the local source to take the job")
    finally:
        stop.set()
        thread.join(WAIT)
    assert intake.jobs["15"].source == "workflow_job"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    path = find_emulator()
    require(path is not None, "the Pub/Sub emulator (java and cloud-pubsub-emulator)")
    with Emulator(path) as emu:
        yield emu


def pull(host: str, subscription: str, count: int, wait: float = WAIT) -> list[Any]:
    """Up to `count` messages (acked), or what arrived within `wait` seconds."""
    client = subscriber_client(host)
    got: list[Any] = []
    try:
        deadline = time.monotonic() + wait
        while len(got) < count and time.monotonic() < deadline:
            resp = client.pull(subscription=subscription, max_messages=1000, timeout=wait)
            got += [m.message for m in resp.received_messages]
            if resp.received_messages:
                client.acknowledge(
                    subscription=subscription, ack_ids=[m.ack_id for m in resp.received_messages]
                )
    finally:
        client.close()
    return got


@pytest.mark.emulator
def test_end_to_end_into_the_emulator(
    emulator: Emulator, serve: Callable[..., WebhookServer], ledger: RedisLedger
) -> None:
    topic = f"hook-{uuid.uuid4().hex[:8]}"
    topic_path, sub_path = ensure_topic_and_subscription(
        emulator.host, PROJECT, topic, topic + "-s"
    )
    client = publisher_client(emulator.host)
    publisher = PubsubPublisher(client, topic_path)
    try:
        server = serve(publisher, ledger)
        body = workflow_job(16)
        headers = github_headers(body, delivery="e2e-1")
        assert (
            requests.post(url(server), data=body, headers=headers, timeout=WAIT).status_code == 202
        )
        assert (
            requests.post(url(server), data=body, headers=headers, timeout=WAIT).json()["outcome"]
            == "duplicate"
        )
    finally:
        publisher.close()
    [message] = pull(emulator.host, sub_path, 1)
    assert message.data == body  # the raw bytes, as signed
    attributes = dict(message.attributes)
    assert attributes == {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": "e2e-1"}
    event = parse(message.data, attributes, POOL, time.time())
    assert (event.source, event.action, event.job_id, event.repo) == (
        "workflow_job",
        "queued",
        "16",
        "acme/api",
    )
    assert pull(emulator.host, sub_path, 1, wait=2.0) == []  # published once


# -- migctl-webhook, the process ------------------------------------------------------------


@pytest.mark.emulator
@pytest.mark.slow
def test_the_migctl_webhook_process(emulator: Emulator, redis_url: str, tmp_path: Path) -> None:
    """The console script on a generated config: answers, publishes, stops on SIGTERM; the
    latency of a delivery (HTTP in, emulator confirms, 202 out) is measured."""
    topic = f"proc-{uuid.uuid4().hex[:8]}"
    _, sub_path = ensure_topic_and_subscription(emulator.host, PROJECT, topic, topic + "-s")
    port = free_port()
    parsed = urlparse(redis_url)
    endpoint = {"host": parsed.hostname, "port": parsed.port}
    config = {
        "pool": {"id": POOL},
        "vm_manager": {"provider": "sim"},
        "github_app": {"app_id": "1", "private_key": "unused"},
        "redis": {"jobs": endpoint, "vm_status": endpoint},
        "pubsub": {
            "project_id": PROJECT,
            "subscription": topic + "-s",
            "topic": topic,
            "emulator_host": emulator.host,
        },
        "server": {"webhook_port": port, "bind": "127.0.0.1"},
        "logging": {"level": "info", "format": "console"},
    }
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONTROLLER_", "PUBSUB_", "MIGCTL_", "GITHUB_"))
    }
    log = tmp_path / "webhook.log"

    # Without a secret it refuses to start, saying which variable to set.
    missing = subprocess.run(
        [str(BIN / "migctl-webhook"), "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert missing.returncode == 2 and "MIGCTL_WEBHOOK_SECRET" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr

    env["GITHUB_WEBHOOK_SECRET"] = SECRET.decode()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "migctl-webhook"), "--config", str(cfg)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return requests.get(base + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                assert proc.poll() is None, log.read_text()
                return False

        wait_for(healthy, "migctl-webhook to answer /health")
        session = requests.Session()
        count = 200
        latencies = []
        for i in range(count):
            body = workflow_job(100_000 + i)
            started = time.monotonic()
            # GitHub's own limit bounds each answer; the figures are printed, not asserted.
            resp = session.post(
                base + "/webhook", data=body, headers=github_headers(body), timeout=GITHUB_LIMIT_S
            )
            latencies.append(time.monotonic() - started)
            assert resp.status_code == 202, resp.text
        bad = session.post(
            base + "/webhook", data=b"{}", headers=github_headers(b"{}", secret=b"not it")
        )
        assert bad.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    messages = pull(emulator.host, sub_path, count)
    assert sorted(
        parse(m.data, dict(m.attributes), POOL, time.time()).job_id for m in messages
    ) == (sorted(str(100_000 + i) for i in range(count)))
    counters = RedisLedger(redis.Redis.from_url(redis_url), POOL).counters()
    assert counters == {"received": count + 1, "accepted": count, "refused:bad_signature": 1}
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(count * 0.99) - 1]
    print(
        f"\nwebhook delivery latency into the emulator: p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
