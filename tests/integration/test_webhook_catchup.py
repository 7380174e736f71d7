"""The catch-up against a local HTTP fake of GitHub's App webhook delivery endpoints.

The fake checks the App JWT (RS256, the App's public key), pages with a cursor and a Link
header as GitHub does, and performs a redelivery by POSTing the signed payload to the
webhook, recording the attempt and its status like GitHub's delivery log.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import redis
import requests
import yaml
from cryptography.hazmat.primitives import serialization

from migctl.bridge.local_source import intake_key
from migctl.domain.errors import PermanentError, TemporaryError
from migctl.sim.keys import generate_app_key
from migctl.sim.stack import free_port
from migctl.webhook.catchup import AppHook, catch_up
from migctl.webhook.ingress import Ingress
from migctl.webhook.ledger import RedisLedger
from migctl.webhook.server import WebhookServer
from migctl.webhook.signature import sign
from migctl.webhook.testing import MemoryPublisher

pytestmark = pytest.mark.integration

APP_ID = "31337"
SECRET = b"catch-up secret"
POOL = "pool-catchup"
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeHookApi:
    """`GET /app/hook/deliveries` and `POST /app/hook/deliveries/{id}/attempts`."""

    public_pem: bytes
    page_size: int = 10
    deliver_to: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    payloads: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # guid -> event, body
    redeliveries: list[int] = field(default_factory=list)  # ids asked for
    refuse: set[int] = field(default_factory=set)  # answer 422 to these
    list_status: int = 200
    page_requests: int = 0
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self, event: str, status_code: int, ago: float, guid: str = "", redelivery: bool = False
    ) -> dict[str, Any]:
        guid = guid or str(uuid.uuid4())
        self.payloads.setdefault(
            guid, (event, json.dumps({"action": "queued", "g": guid}).encode())
        )
        item = {
            "id": next(self._ids),
            "guid": guid,
            "delivered_at": iso(time.time() - ago),
            "redelivery": redelivery,
            "duration": 0.1,
            "status": "OK" if 200 <= status_code < 300 else "failed",
            "status_code": status_code,
            "event": event,
            "action": "queued",
            "installation_id": 1,
            "repository_id": 2,
        }
        with self._lock:
            self.attempts.append(item)
        return item

    def redeliver(self, delivery_id: int) -> None:
        """What GitHub does on request: deliver the same payload again, log the attempt."""
        with self._lock:
            original = next(a for a in self.attempts if a["id"] == delivery_id)
        event, body = self.payloads[original["guid"]]
        try:
            resp = requests.post(
                self.deliver_to,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "X-GitHub-Event": event,
                    "X-GitHub-Delivery": original["guid"],
                    "X-Hub-Signature-256": sign(SECRET, body),
                },
                timeout=10,
            )
            status = resp.status_code
        except requests.RequestException:
            status = 0
        self.add(event, status, 0, original["guid"], redelivery=True)

    # -- HTTP -----------------------------------------------------------------------------

    def start(self) -> FakeHookApi:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any, link: str = "") -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if link:
                    self.send_header("Link", link)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                auth = self.headers.get("Authorization", "")
                try:
                    claims = jwt.decode(
                        auth.removeprefix("Bearer "),
                        fake.public_pem,
                        algorithms=["RS256"],
                        options={"require": ["iat", "exp", "iss"]},
                    )
                    ok = bool(claims["iss"] == APP_ID and claims["exp"] - time.time() <= 600)
                except jwt.PyJWTError:
                    ok = False
                if not ok:
                    self._answer(401, {"message": "A JSON web token could not be decoded"})
                return ok

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/app/hook/deliveries":
                    self._answer(404, {"message": "Not Found"})
                    return
                if not self._authorised():
                    return
                fake.page_requests += 1
                if fake.list_status != 200:
                    self._answer(fake.list_status, {"message": "Server Error"})
                    return
                query = parse_qs(parts.query)
                per_page = min(int(query.get("per_page", ["30"])[0]), fake.page_size)
                cursor = int(query.get("cursor", ["0"])[0])
                with fake._lock:
                    newest_first = sorted(fake.attempts, key=lambda a: -a["id"])
                if cursor:
                    newest_first = [a for a in newest_first if a["id"] < cursor]
                page = newest_first[:per_page]
                link = ""
                if len(newest_first) > per_page:
                    base = f"http://127.0.0.1:{server.server_address[1]}"
                    next_query = f"per_page={per_page}&cursor={page[-1]['id']}"
                    link = f'<{base}/app/hook/deliveries?{next_query}>; rel="next"'
                self._answer(200, page, link)

            def do_POST(self) -> None:
                parts = urlsplit(self.path).path.split("/")
                # /app/hook/deliveries/{id}/attempts
                if parts[1:4] != ["app", "hook", "deliveries"] or parts[5:] != ["attempts"]:
                    self._answer(404, {"message": "Not Found"})
                    return
                if not self._authorised():
                    return
                delivery_id = int(parts[4])
                if delivery_id in fake.refuse:
                    self._answer(422, {"message": "Validation Failed"})
                    return
                fake.redeliveries.append(delivery_id)
                self._answer(202, {})
                if fake.deliver_to:
                    threading.Thread(target=fake.redeliver, args=(delivery_id,)).start()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_app_key()


@pytest.fixture
def github(keys: tuple[bytes, bytes]) -> Iterator[FakeHookApi]:
    fake = FakeHookApi(keys[1]).start()
    yield fake
    fake.stop()


def hook(fake: FakeHookApi, private_pem: bytes) -> AppHook:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return AppHook(fake.url, APP_ID, key)  # type: ignore[arg-type]


@pytest.fixture
def webhook(redis_url: str) -> Iterator[tuple[WebhookServer, MemoryPublisher]]:
    publisher = MemoryPublisher()
    ledger = RedisLedger(redis.Redis.from_url(redis_url), POOL)
    server = WebhookServer(("127.0.0.1", 0), Ingress(SECRET, publisher, ledger))
    server.start()
    yield server, publisher
    server.stop(grace_s=2)


def seed(fake: FakeHookApi) -> dict[str, str]:
    """A delivery log with every case the catch-up must tell apart, added oldest first as
    GitHub numbers them; returns guids by case."""
    names = {case: str(uuid.uuid4()) for case in ("down", "503", "ok", "push", "413", "old", "3")}
    log: list[tuple[float, str, int, str, bool]] = [  # ago, event, status, guid, redelivery
        (7 * 3600, "workflow_job", 503, names["old"], False),  # outside the 6 h window
        *((3000 + i, "workflow_job", 202, str(uuid.uuid4()), False) for i in range(40)),
        (900, "workflow_job", 503, names["3"], False),  # failed three times: a person looks
        (800, "workflow_job", 503, names["3"], True),
        (700, "workflow_job", 503, names["3"], True),
        (600, "workflow_job", 0, names["down"], False),  # we were down: no answer
        (300, "workflow_job", 503, names["503"], False),
        (250, "push", 503, names["push"], False),
        (240, "workflow_job", 413, names["413"], False),
        (200, "workflow_job", 202, names["ok"], False),
    ]
    for ago, event, status, guid, redelivery in sorted(log, key=lambda e: -e[0]):
        fake.add(event, status, ago, guid, redelivery)
    return names


def test_catch_up_redelivers_each_failed_job_delivery_once(
    github: FakeHookApi,
    keys: tuple[bytes, bytes],
    webhook: tuple[WebhookServer, MemoryPublisher],
) -> None:
    server, publisher = webhook
    github.deliver_to = f"http://127.0.0.1:{server.port}/webhook"
    names = seed(github)
    api = hook(github, keys[0])

    report = catch_up(api, time.time())
    assert report.redelivered == [names["down"], names["503"]]  # oldest first
    assert report.failed == [] and report.listed == len(github.attempts) - 1  # all but "old"
    # It paged (10 a page) down to the window's edge and no further.
    assert github.page_requests == -(-len(github.attempts) // github.page_size)

    wait(lambda: len(publisher.messages) == 2, "the webhook to receive both redeliveries")
    assert sorted(attrs["X-GitHub-Delivery"] for _, attrs in publisher.messages) == sorted(
        [names["down"], names["503"]]
    )
    # GitHub logs the redeliveries as successes: the next pass has nothing to do.
    wait(
        lambda: sum(a["redelivery"] and a["status_code"] == 202 for a in github.attempts) == 2,
        "GitHub to log the redeliveries",
    )
    again = catch_up(api, time.time())
    assert again.redelivered == [] and len(github.redeliveries) == 2


def test_a_refused_redelivery_is_reported_and_the_pass_goes_on(
    github: FakeHookApi, keys: tuple[bytes, bytes]
) -> None:
    first = github.add("workflow_job", 503, 100)
    second = github.add("workflow_job", 503, 50)
    github.refuse = {first["id"]}
    report = catch_up(hook(github, keys[0]), time.time())
    assert report.redelivered == [second["guid"]]
    [failure] = report.failed
    assert failure.startswith(first["guid"]) and "422" in failure and "3 days" in failure


def test_a_key_github_does_not_know_is_permanent(github: FakeHookApi) -> None:
    other_key, _ = generate_app_key()
    github.add("workflow_job", 503, 100)
    with pytest.raises(PermanentError, match=r"check github_app\.app_id and the private key"):
        catch_up(hook(github, other_key), time.time())
    assert github.redeliveries == []


def test_github_down_is_temporary(github: FakeHookApi, keys: tuple[bytes, bytes]) -> None:
    github.list_status = 502
    with pytest.raises(TemporaryError, match="502"):
        catch_up(hook(github, keys[0]), time.time())


# -- migctl-webhook --catch-up / --catch-up-every ---------------------------------------------


def write_config(tmp_path: Path, redis_url: str, fake: FakeHookApi, private_pem: bytes) -> Path:
    key_path = tmp_path / "app.pem"
    key_path.write_bytes(private_pem)
    parsed = urlsplit(redis_url)
    endpoint = {"host": parsed.hostname, "port": parsed.port}
    config = {
        "pool": {"id": POOL},
        "vm_manager": {"provider": "sim"},
        "github_app": {"app_id": APP_ID, "private_key_path": str(key_path), "base_url": fake.url},
        "redis": {"jobs": endpoint, "vm_status": endpoint},
        "pubsub": {"source": "local"},
        "server": {"webhook_port": free_port(), "bind": "127.0.0.1"},
        "logging": {"level": "info", "format": "console"},
    }
    path = tmp_path / "controller.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONTROLLER_", "PUBSUB_", "MIGCTL_", "GITHUB_", "REDIS_"))
    }
    return {**env, **extra}


def test_the_catch_up_command(
    github: FakeHookApi, keys: tuple[bytes, bytes], redis_url: str, tmp_path: Path
) -> None:
    failed = github.add("workflow_job", 500, 120)
    github.add("workflow_job", 202, 60)
    cfg = write_config(tmp_path, redis_url, github, keys[0])
    result = subprocess.run(
        [str(BIN / "migctl-webhook"), "--config", str(cfg), "--catch-up"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"listed": 2, "redelivered": [failed["guid"]], "failed": []}
    assert github.redeliveries == [failed["id"]]


def test_the_server_catches_up_periodically(
    github: FakeHookApi, keys: tuple[bytes, bytes], redis_url: str, tmp_path: Path
) -> None:
    """Deliveries GitHub could not make while we were down arrive once we run, once each,
    however many passes run."""
    missed = [github.add("workflow_job", 0, 300 - i) for i in range(3)]
    cfg = write_config(tmp_path, redis_url, github, keys[0])
    port = yaml.safe_load(cfg.read_text())["server"]["webhook_port"]
    github.deliver_to = f"http://127.0.0.1:{port}/webhook"
    log = tmp_path / "webhook.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "migctl-webhook"), "--config", str(cfg), "--catch-up-every", "0.3"],
            env=clean_env(MIGCTL_WEBHOOK_SECRET=SECRET.decode()),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    r = redis.Redis.from_url(redis_url)
    try:

        def queued() -> list[str]:
            envelopes = [json.loads(raw) for raw in r.lrange(intake_key(POOL), 0, -1)]
            return [e["attributes"]["X-GitHub-Delivery"] for e in envelopes]

        wait(lambda: len(queued()) == 3, "the missed deliveries", lambda: log.read_text())
        passes_before = github.page_requests
        wait(lambda: github.page_requests >= passes_before + 3, "three more passes")
        assert sorted(queued()) == sorted(m["guid"] for m in missed)
        assert sorted(github.redeliveries) == [m["id"] for m in missed]
        body = base64.b64decode(json.loads(r.lindex(intake_key(POOL), 0) or b"{}")["data"])
        assert json.loads(body)["action"] == "queued"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait(predicate: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{detail()[-3000:]}")
        time.sleep(0.05)
