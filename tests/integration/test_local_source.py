"""The Redis-list job source against a real Redis (DB 14 only), crash recovery included."""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migctl.bridge.local_source import LocalSource, processing_key, publish_local
from migctl.bridge.ports import Outcome
from migctl.bridge.testing import MemoryIntake

pytestmark = pytest.mark.integration

POOL = "pool-2"
QUEUE, PROCESSING = "migctl:{pool-2}:intake", "migctl:{pool-2}:intake:processing"
WAIT = 30.0
ROOT = Path(__file__).resolve().parents[2]


def job(job_id: int, **over: Any) -> bytes:
    body = {"job_id": job_id, "run_id": 77, "labels": ["self-hosted"], "pool_id": POOL}
    body.update(over)
    return json.dumps(body).encode()


def wait_for(
    predicate: Callable[[], bool], what: str, detail: Callable[[], Any] = lambda: ""
) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT:.0f} s waiting for {what}; {detail()}")
        time.sleep(0.02)


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@dataclass
class Running:
    source: LocalSource
    intake: MemoryIntake
    stop: threading.Event
    thread: threading.Thread

    def wait(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> None:
        wait_for(
            lambda: predicate(self.source.stats()), what, lambda: f"stats={self.source.stats()}"
        )

    def shut_down(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"LocalSource.run did not return {WAIT:.0f} s after stop"


@pytest.fixture
def start_source(r: redis.Redis) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(intake: MemoryIntake | None = None, client: redis.Redis | None = None) -> Running:
        intake = intake or MemoryIntake()
        # A short block keeps shutdown quick; production uses the 1 s default.
        source = LocalSource(client or r, POOL, intake, POOL, block_seconds=0.1)
        stop = threading.Event()
        thread = threading.Thread(target=source.run, args=(stop,), name="local-source", daemon=True)
        thread.start()
        started.append(Running(source, intake, stop, thread))
        return started[-1]

    yield start
    for running in started:
        running.shut_down()


def test_keys_are_namespaced_by_pool_with_a_hash_tag(r: redis.Redis) -> None:
    message_id = publish_local(r, POOL, b"data", {"a": "b"})
    assert r.llen(QUEUE) == 1 and processing_key(POOL) == PROCESSING
    envelope = json.loads(r.lindex(QUEUE, 0))
    assert envelope == {
        "data": base64.b64encode(b"data").decode(),
        "attributes": {"a": "b"},
        "id": message_id,
    }


def test_valid_message_is_accepted_and_acked(
    r: redis.Redis, start_source: Callable[..., Running]
) -> None:
    run = start_source()
    publish_local(r, POOL, job(1), {"origin": "test"})
    publish_local(r, POOL, job(1))
    run.wait("both copies", lambda s: s["acked"] == 2)
    assert [o for _, o in run.intake.outcomes] == [Outcome.CREATED, Outcome.DUPLICATE]
    assert r.llen(QUEUE) == 0 and r.llen(PROCESSING) == 0
    stats = run.source.stats()
    assert (stats["received"], stats["created"], stats["duplicates"], stats["nacked"]) == (
        2,
        1,
        1,
        0,
    )


def test_bad_messages_are_dead_lettered_and_the_flow_continues(
    r: redis.Redis, start_source: Callable[..., Running]
) -> None:
    run = start_source()
    bad_id = publish_local(r, POOL, b"{", {"origin": "test"})
    publish_local(r, POOL, job(2, pool_id="pool-4"))
    r.lpush(QUEUE, b"garbage")
    r.lpush(QUEUE, json.dumps({"id": "x1", "data": "***", "attributes": {}}))
    publish_local(r, POOL, job(3))
    run.wait("the valid job after four bad ones", lambda s: s["acked"] == 5)
    reasons = sorted(d.reason for d in run.intake.dead_letters.values())
    assert reasons == [
        "envelope: data: not base64 (Only base64 data is allowed)",
        "envelope: not JSON: Expecting value: line 1 column 1 (char 0)",
        "not JSON: Expecting property name enclosed in double quotes at char 1",
        "pool_id 'pool-4' is not this pool 'pool-2'",
    ]
    assert run.intake.dead_letters[bad_id].attributes == {"origin": "test"}
    assert list(run.intake.jobs) == ["3"]
    assert r.llen(QUEUE) == 0 and r.llen(PROCESSING) == 0
    assert run.source.stats()["dead_lettered"] == 4


def test_temporary_error_requeues_then_succeeds(
    r: redis.Redis, start_source: Callable[..., Running]
) -> None:
    intake = MemoryIntake()
    intake.fail_accept(2)
    run = start_source(intake)
    publish_local(r, POOL, job(4))
    run.wait("the job after two temporary errors", lambda s: s["acked"] == 1)
    assert intake.deliveries("4") == 3 and run.source.stats()["nacked"] == 2
    assert r.llen(QUEUE) == 0 and r.llen(PROCESSING) == 0


def test_unexpected_error_dead_letters_after_five_deliveries(
    r: redis.Redis, start_source: Callable[..., Running]
) -> None:
    intake = MemoryIntake()
    intake.fail_accept(100, KeyError("job"))
    run = start_source(intake)
    message_id = publish_local(r, POOL, job(5))
    run.wait("the poison message to be dead-lettered", lambda s: s["dead_lettered"] == 1)
    assert intake.dead_letters[message_id].reason == "failed 5 deliveries: KeyError: 'job'"
    assert (run.source.stats()["errors"], run.source.stats()["nacked"]) == (5, 4)
    assert r.llen(QUEUE) == 0 and r.llen(PROCESSING) == 0


_CRASHING_CONSUMER = """
import sys, threading
import redis
from migctl.bridge.local_source import LocalSource
from migctl.bridge.testing import MemoryIntake

def hang(event):
    print("in accept", flush=True)
    threading.Event().wait()

url, pool = sys.argv[1:3]
LocalSource(redis.Redis.from_url(url), pool, MemoryIntake(hang), pool).run(threading.Event())
"""


def test_crash_mid_message_is_recovered_at_next_start(
    r: redis.Redis, redis_url: str, start_source: Callable[..., Running]
) -> None:
    first = publish_local(r, POOL, job(6))
    publish_local(r, POOL, job(7))
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_CONSUMER, redis_url, POOL],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # so `migctl` imports from this checkout
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in accept", "the consumer never took a message"
        assert r.llen(PROCESSING) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        if child.stdout is not None:
            child.stdout.close()
    left = json.loads(r.lindex(PROCESSING, 0))
    assert left["id"] == first

    run = start_source()
    run.wait("both jobs after recovery", lambda s: s["acked"] == 2)
    assert sorted(run.intake.jobs) == ["6", "7"]
    assert run.intake.deliveries("6") == 1, "the recovered message was handled once"
    assert r.llen(QUEUE) == 0 and r.llen(PROCESSING) == 0


def test_recovery_counts_the_lost_delivery(
    r: redis.Redis, start_source: Callable[..., Running]
) -> None:
    # Four crashed deliveries already: one more unexpected error is the fifth and dead-letters it.
    envelope = {
        "id": "m-1",
        "data": base64.b64encode(job(8)).decode(),
        "attributes": {},
        "attempt": 3,
    }
    r.lpush(PROCESSING, json.dumps(envelope))
    intake = MemoryIntake()
    intake.fail_accept(1, RuntimeError("bug"))
    run = start_source(intake)
    run.wait("the message to be dead-lettered", lambda s: s["dead_lettered"] == 1)
    assert intake.dead_letters["m-1"].reason == "failed 5 deliveries: RuntimeError: bug"


def test_unreachable_redis_is_retried_until_stop(
    start_source: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No client-side retries (redis-py 8 retries 3 times by default): the source's loop retries.
    client = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    caplog.set_level(logging.WARNING, logger="migctl.bridge.local_source")
    run = start_source(client=client)
    wait_for(
        lambda: sum("retrying" in m for m in caplog.messages) >= 2,
        "two retries to be logged",
        lambda: caplog.messages,
    )
    run.shut_down()
    client.close()
