"""The bridge: Pub/Sub streaming pull -> parse -> `Intake.accept` -> ack.

`Handler` holds the per-message decision (ack, nack, dead-letter) and the counters; the
Pub/Sub `Bridge` and the Redis `LocalSource` both drive it, so they behave alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from migctl.bridge.messages import InvalidMessage, parse
from migctl.bridge.ports import SOURCE_COUNTERS, Intake, Outcome
from migctl.domain.errors import TemporaryError

log = logging.getLogger(__name__)

MAX_FAILED_DELIVERIES = 5  # unexpected errors on one message before it is dead-lettered
_FAILURES_TRACKED = 10_000  # message ids remembered for that count; oldest forgotten first
MAX_NACK_DELAY = 10.0  # longest a callback thread waits before nacking (Redis down)
_RESUBSCRIBE_FIRST = 0.5
_RESUBSCRIBE_CAP = 30.0
_ATTRIBUTE_MAX_BYTES = 1024  # Pub/Sub's limit on one attribute value
_OUTCOME_COUNTER = {
    Outcome.CREATED: "created",
    Outcome.DUPLICATE: "duplicates",
    Outcome.UPDATED: "updated",
    Outcome.IGNORED: "ignored",
}
PublishDeadLetter = Callable[[bytes, Mapping[str, str], str, str], None]


class Verdict(StrEnum):
    ACK = "ack"
    NACK = "nack"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0  # seconds to hold a nack back, so a down store is not hammered


class Counters:
    """Thread-safe counters behind `stats()`."""

    NAMES = SOURCE_COUNTERS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)
        self._last_message_at: float | None = None

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def received(self, at: float) -> None:
        with self._lock:
            self._counts["received"] += 1
            self._last_message_at = at

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "last_message_at": self._last_message_at}


class Handler:
    """One message in, one `Decision` out; never raises."""

    def __init__(
        self,
        intake: Intake,
        expected_pool: str,
        counters: Counters,
        clock: Callable[[], float] = time.time,
        publish_dead_letter: PublishDeadLetter | None = None,
    ) -> None:
        self.intake = intake
        self.expected_pool = expected_pool
        self.counters = counters
        self.clock = clock
        self.publish_dead_letter = publish_dead_letter
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def handle(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        message_id: str,
        delivery_attempt: int | None = None,
    ) -> Decision:
        now = self.clock()
        self.counters.received(now)
        try:
            event = parse(data, attributes, self.expected_pool, now)
        except InvalidMessage as exc:
            log.warning("message %s is invalid, dead-lettering it: %s", message_id, exc.reason)
            return self.reject(data, attributes, message_id, exc.reason)
        try:
            outcome = self.intake.accept(event)
        except TemporaryError as exc:
            log.warning("message %s: %s; it will be redelivered", message_id, exc)
            return Decision(Verdict.NACK, exc.delay)
        except Exception as exc:
            return self._failed(data, attributes, message_id, delivery_attempt, exc)
        self._forget(message_id)
        self.counters.incr(_OUTCOME_COUNTER[outcome])
        log.debug("message %s: job %s %s -> %s", message_id, event.job_id, event.action, outcome)
        return Decision(Verdict.ACK)

    def reject(
        self, data: bytes, attributes: Mapping[str, str], message_id: str, reason: str
    ) -> Decision:
        """Dead-letter a message (intake, then the dead-letter topic if any); ack on success."""
        try:
            self.intake.dead_letter(data, attributes, reason, message_id)
            if self.publish_dead_letter is not None:
                self.publish_dead_letter(data, attributes, reason, message_id)
        except TemporaryError as exc:
            log.warning(
                "message %s: dead-lettering failed: %s; it will be redelivered", message_id, exc
            )
            return Decision(Verdict.NACK, exc.delay)
        except Exception:
            self.counters.incr("errors")
            log.exception("BUG: dead-lettering message %s failed; nacking it", message_id)
            # Keep it in the subscription rather than drop it, but do not spin on it.
            return Decision(Verdict.NACK, MAX_NACK_DELAY)
        self._forget(message_id)
        self.counters.incr("dead_lettered")
        return Decision(Verdict.ACK)

    def _failed(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        message_id: str,
        delivery_attempt: int | None,
        exc: Exception,
    ) -> Decision:
        self.counters.incr("errors")
        attempts = self._record_failure(message_id, delivery_attempt)
        log.error(
            "BUG: unexpected error on message %s (failed delivery %d of %d before dead-letter)",
            message_id,
            attempts,
            MAX_FAILED_DELIVERIES,
            exc_info=exc,
        )
        if attempts < MAX_FAILED_DELIVERIES:
            return Decision(Verdict.NACK)
        reason = f"failed {attempts} deliveries: {type(exc).__name__}: {exc}"
        return self.reject(data, attributes, message_id, reason.splitlines()[0][:500])

    def _record_failure(self, message_id: str, delivery_attempt: int | None) -> int:
        with self._lock:
            count = self._failures.pop(message_id, 0) + 1
            self._failures[message_id] = count
            while len(self._failures) > _FAILURES_TRACKED:
                self._failures.popitem(last=False)
        # Pub/Sub's own count survives our restarts; it is set with a dead-letter policy.
        return max(count, delivery_attempt or 0)

    def _forget(self, message_id: str) -> None:
        with self._lock:
            self._failures.pop(message_id, None)


class Bridge:
    """Streaming pull on one subscription until `stop` is set; resubscribes when the stream dies."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription_path: str,
        intake: Intake,
        expected_pool: str,
        max_messages: int = 100,
        publisher: pubsub_v1.PublisherClient | None = None,
        dead_letter_topic: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.subscriber = subscriber
        self.subscription_path = subscription_path
        self.max_messages = max_messages
        self.publisher = publisher
        self.dead_letter_topic = dead_letter_topic
        self._counters = Counters()
        publish = self._publish_dead_letter if publisher and dead_letter_topic else None
        self._handler = Handler(intake, expected_pool, self._counters, clock, publish)
        self._stop = threading.Event()
        self._stream_restarts = 0

    def stats(self) -> dict[str, Any]:
        return {**self._counters.snapshot(), "stream_restarts": self._stream_restarts}

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set, then cancel and wait for in-flight callbacks."""
        self._stop = stop
        delay = _RESUBSCRIBE_FIRST
        while not stop.is_set():
            started = time.monotonic()
            try:
                future = self.subscriber.subscribe(
                    self.subscription_path,
                    callback=self._on_message,
                    flow_control=pubsub_v1.types.FlowControl(max_messages=self.max_messages),
                    await_callbacks_on_shutdown=True,
                )
            except Exception as exc:
                error: BaseException = exc
            else:
                log.info("bridge: pulling from %s", self.subscription_path)
                # The future has no way to wake us on `stop`; poll both.
                while not future.done() and not stop.wait(0.2):
                    pass
                if stop.is_set():
                    self._shutdown(future)
                    return
                error = future.exception() or RuntimeError("stream ended by itself")
            self._stream_restarts += 1
            if time.monotonic() - started > _RESUBSCRIBE_CAP:
                delay = _RESUBSCRIBE_FIRST  # the stream was healthy for a while: start over
            log.error(
                "bridge: streaming pull on %s failed (%s: %s); resubscribing in %.1f s",
                self.subscription_path,
                type(error).__name__,
                error,
                delay,
            )
            stop.wait(delay)
            delay = min(delay * 2, _RESUBSCRIBE_CAP)

    def _shutdown(self, future: Any) -> None:
        log.info("bridge: stopping; waiting for in-flight messages")
        future.cancel()
        try:
            future.result()  # returns once the callbacks in flight have finished
        except Exception as exc:
            log.warning("bridge: stream ended with %s: %s", type(exc).__name__, exc)

    def _on_message(self, message: Any) -> None:
        try:
            decision = self._handler.handle(
                message.data,
                dict(message.attributes),
                message.message_id,
                message.delivery_attempt,
            )
        except Exception:  # Handler never raises; if it does, the message must come back
            log.exception("BUG: handler raised on message %s", message.message_id)
            self._counters.incr("errors")
            decision = Decision(Verdict.NACK)
        if decision.verdict is Verdict.ACK:
            message.ack()
            self._counters.incr("acked")
            return
        if decision.delay > 0:
            self._stop.wait(min(decision.delay, MAX_NACK_DELAY))
        message.nack()
        self._counters.incr("nacked")

    def _publish_dead_letter(
        self, raw: bytes, attributes: Mapping[str, str], reason: str, message_id: str
    ) -> None:
        assert self.publisher is not None
        attrs = {
            **attributes,
            "dead_letter_reason": _clip(reason, _ATTRIBUTE_MAX_BYTES),
            "dead_letter_message_id": message_id,
            "dead_letter_subscription": self.subscription_path,
        }
        try:
            self.publisher.publish(self.dead_letter_topic, raw, **attrs).result(timeout=30)
        except (gexc.GoogleAPIError, TimeoutError) as exc:
            raise TemporaryError(
                f"dead-letter topic {self.dead_letter_topic}: {type(exc).__name__}: {exc}"
            ) from exc


def _clip(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")
