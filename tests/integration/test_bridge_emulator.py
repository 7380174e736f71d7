"""The Pub/Sub bridge against the official emulator, through the real google-cloud-pubsub client."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.cloud import pubsub_v1

from migctl.bridge.ports import Outcome
from migctl.bridge.subscriber import Bridge
from migctl.bridge.testing import MemoryIntake
from migctl.sim.pubsub_emulator import (
    Emulator,
    ensure_topic_and_subscription,
    find_emulator,
    publish,
    publisher_client,
    subscriber_client,
)

pytestmark = pytest.mark.emulator

PROJECT = "migctl-test"
POOL = "pool-2"
WAIT = 30.0  # bounded waits; the emulator answers in milliseconds


def job(job_id: int, **over: Any) -> bytes:
    body = {"job_id": job_id, "run_id": 77, "labels": ["self-hosted", "linux"], "pool_id": POOL}
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


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    path = find_emulator()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but the Pub/Sub emulator (or java) is missing: install it")
        pytest.skip("Pub/Sub emulator or java not installed")
    with Emulator(path) as emu:
        yield emu


@dataclass
class Topic:
    host: str
    name: str
    path: str
    subscription: str  # full path

    def publish(self, data: bytes, attributes: dict[str, str] | None = None) -> str:
        return publish(self.host, PROJECT, self.name, data, attributes)


def make_topic(host: str, prefix: str) -> Topic:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    path, sub = ensure_topic_and_subscription(host, PROJECT, name, f"{name}-sub")
    return Topic(host, name, path, sub)


@pytest.fixture
def topic(emulator: Emulator) -> Topic:
    return make_topic(emulator.host, "jobs")


@pytest.fixture
def subscriber(emulator: Emulator) -> Iterator[pubsub_v1.SubscriberClient]:
    client = subscriber_client(emulator.host)
    yield client
    client.close()


@dataclass
class Running:
    bridge: Bridge
    intake: MemoryIntake
    stop: threading.Event
    thread: threading.Thread

    def stats(self) -> dict[str, Any]:
        return self.bridge.stats()

    def wait(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> None:
        wait_for(lambda: predicate(self.stats()), what, lambda: f"stats={self.stats()}")

    def shut_down(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"Bridge.run did not return {WAIT:.0f} s after stop"


@pytest.fixture
def start_bridge(
    topic: Topic, subscriber: pubsub_v1.SubscriberClient
) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(intake: MemoryIntake | None = None, **kw: Any) -> Running:
        intake = intake or MemoryIntake()
        bridge = Bridge(subscriber, topic.subscription, intake, POOL, **kw)
        stop = threading.Event()
        thread = threading.Thread(target=bridge.run, args=(stop,), name="bridge", daemon=True)
        thread.start()
        started.append(Running(bridge, intake, stop, thread))
        return started[-1]

    yield start
    for running in started:
        running.shut_down()


def test_valid_message_is_accepted_and_acked(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    run = start_bridge()
    topic.publish(job(1), {"origin": "test"})
    run.wait("the job to be acked", lambda s: s["acked"] == 1)
    # A later message proves the stream moved on; the first one was not redelivered meanwhile.
    topic.publish(job(2))
    run.wait("the second job", lambda s: s["acked"] == 2)
    run.shut_down()
    assert run.intake.deliveries("1") == 1
    assert [o for _, o in run.intake.outcomes] == [Outcome.CREATED, Outcome.CREATED]
    event = run.intake.jobs["1"]
    assert (event.job_id, event.run_id, event.pool_id, event.source) == (
        "1",
        "77",
        POOL,
        "job_message",
    )
    stats = run.stats()
    assert (stats["received"], stats["created"], stats["nacked"], stats["errors"]) == (2, 2, 0, 0)
    assert stats["last_message_at"] is not None


def test_duplicates_reach_the_intake_as_duplicate(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    run = start_bridge()
    topic.publish(job(5))
    run.wait("the first copy", lambda s: s["acked"] == 1)
    topic.publish(job(5))
    run.wait("the second copy", lambda s: s["acked"] == 2)
    assert [o for _, o in run.intake.outcomes] == [Outcome.CREATED, Outcome.DUPLICATE]
    assert run.stats()["duplicates"] == 1


def test_workflow_job_updates_a_known_job(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    run = start_bridge()
    topic.publish(job(9))
    run.wait("the queued job", lambda s: s["acked"] == 1)
    webhook = {
        "action": "completed",
        "workflow_job": {"id": 9, "run_id": 77, "labels": ["linux"], "conclusion": "success"},
        "repository": {"full_name": "acme/api"},
    }
    topic.publish(json.dumps(webhook).encode(), {"X-GitHub-Event": "workflow_job"})
    run.wait("the completed event", lambda s: s["updated"] == 1)
    assert run.intake.jobs["9"].conclusion == "success"


def test_malformed_is_dead_lettered_and_the_flow_continues(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    run = start_bridge()
    bad_id = topic.publish(b"not json", {"origin": "test"})
    topic.publish(job(3, pool_id="pool-4"))
    topic.publish(job(4))
    run.wait("the valid job after the bad ones", lambda s: s["created"] == 1 and s["acked"] == 3)
    letters = run.intake.dead_letters
    assert letters[bad_id].reason == "not JSON: Expecting value at char 0"
    assert letters[bad_id].raw == b"not json" and letters[bad_id].attributes == {"origin": "test"}
    assert sorted(d.reason for d in letters.values()) == [
        "not JSON: Expecting value at char 0",
        "pool_id 'pool-4' is not this pool 'pool-2'",
    ]
    assert run.stats()["dead_lettered"] == 2 and run.stats()["nacked"] == 0


def test_temporary_error_nacks_then_redelivery_succeeds(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    intake = MemoryIntake()
    intake.fail_accept(2)
    run = start_bridge(intake)
    topic.publish(job(11))
    run.wait("the job after two temporary errors", lambda s: s["acked"] == 1)
    assert intake.deliveries("11") == 3
    stats = run.stats()
    assert (stats["nacked"], stats["received"], stats["created"]) == (2, 3, 1)


def test_unexpected_error_dead_letters_after_five_deliveries(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    intake = MemoryIntake()
    intake.fail_accept(100, RuntimeError("boom"))
    run = start_bridge(intake)
    message_id = topic.publish(job(12))
    run.wait("the poison message to be dead-lettered", lambda s: s["dead_lettered"] == 1)
    assert intake.dead_letters[message_id].reason == "failed 5 deliveries: RuntimeError: boom"
    stats = run.stats()
    assert (stats["errors"], stats["nacked"], stats["acked"]) == (5, 4, 1)


def test_dead_letter_topic_receives_the_bad_message(
    emulator: Emulator,
    topic: Topic,
    subscriber: pubsub_v1.SubscriberClient,
    start_bridge: Callable[..., Running],
) -> None:
    dlq = make_topic(emulator.host, "dlq")
    publisher = publisher_client(emulator.host)
    try:
        run = start_bridge(publisher=publisher, dead_letter_topic=dlq.path)
        message_id = topic.publish(b'{"job_id": 1}', {"X-GitHub-Delivery": "abc"})
        run.wait("the bad message to be dead-lettered", lambda s: s["dead_lettered"] == 1)
        received: list[Any] = []

        def pulled() -> bool:
            response = subscriber.pull(subscription=dlq.subscription, max_messages=1, timeout=5)
            received.extend(response.received_messages)
            return bool(received)

        wait_for(pulled, "the dead-letter topic to receive the message")
        message = received[0].message
        assert message.data == b'{"job_id": 1}'
        assert dict(message.attributes) == {
            "X-GitHub-Delivery": "abc",
            "dead_letter_reason": "run_id: field required; labels: field required",
            "dead_letter_message_id": message_id,
            "dead_letter_subscription": topic.subscription,
        }
    finally:
        publisher.stop()
        publisher.transport.close()


def test_stop_waits_for_the_message_in_flight(
    topic: Topic, start_bridge: Callable[..., Running]
) -> None:
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def hold(_: Any) -> None:
        entered.set()
        release.wait(WAIT)
        order.append("callback finished")

    run = start_bridge(MemoryIntake(before_accept=hold))
    topic.publish(job(21))
    wait_for(entered.is_set, "the callback to start")
    run.stop.set()
    run.thread.join(1.0)  # the callback is blocked on `release`: run() must still be waiting
    assert run.thread.is_alive(), "Bridge.run returned while a callback was still running"
    release.set()
    run.thread.join(WAIT)
    assert not run.thread.is_alive(), "Bridge.run did not return after the callback finished"
    order.append("run returned")
    assert order == ["callback finished", "run returned"]
    assert run.stats()["acked"] == 1 and run.intake.jobs["21"].job_id == "21"


def test_resubscribes_when_the_stream_fails(
    topic: Topic, subscriber: pubsub_v1.SubscriberClient, start_bridge: Callable[..., Running]
) -> None:
    run = start_bridge()
    topic.publish(job(31))
    run.wait("the first job", lambda s: s["acked"] == 1)
    # Deleting the subscription ends the stream with NotFound, which the client does not retry.
    subscriber.delete_subscription(subscription=topic.subscription)
    run.wait("the bridge to notice the broken stream", lambda s: s["stream_restarts"] >= 1)
    ensure_topic_and_subscription(
        topic.host, PROJECT, topic.name, topic.subscription.rsplit("/", 1)[1]
    )
    topic.publish(job(32))
    run.wait("the job published after the subscription came back", lambda s: s["acked"] == 2)
    assert "32" in run.intake.jobs
