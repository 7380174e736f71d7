"""A Redis-list job source for the local world, when the Pub/Sub emulator is not installed.

Same `Handler` as the Pub/Sub bridge. Envelopes `{"data": base64, "attributes": {...},
"id": str, "attempt": int}` are LPUSHed on `migctl:{pool}:intake`; the consumer BLMOVEs each
to `...:intake:processing`, handles it, then LREMs it (the ack). Run one consumer per pool:
at start it moves whatever a crashed consumer left in `processing` back to the queue.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import redis

from migctl.bridge.ports import Intake
from migctl.bridge.subscriber import MAX_NACK_DELAY, Counters, Decision, Handler, Verdict

log = logging.getLogger(__name__)
Raw = bytes | str  # str when the client was made with decode_responses=True

_REDIS_RETRY_FIRST = 0.2
_REDIS_RETRY_CAP = 5.0

# Put a taken item back only if it is still ours, so a requeue never duplicates it.
_REQUEUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def intake_key(pool_id: str) -> str:
    # The braces are a Redis Cluster hash tag: both lists land in one slot, as BLMOVE needs.
    return f"migctl:{{{pool_id}}}:intake"


def processing_key(pool_id: str) -> str:
    return f"migctl:{{{pool_id}}}:intake:processing"


def publish_local(
    redis_client: redis.Redis,
    pool_id: str,
    data: bytes,
    attributes: Mapping[str, str] | None = None,
) -> str:
    """Queue one message for the pool's LocalSource; returns its id."""
    message_id = uuid.uuid4().hex
    envelope = {
        "data": base64.b64encode(data).decode("ascii"),
        "attributes": dict(attributes or {}),
        "id": message_id,
    }
    redis_client.lpush(intake_key(pool_id), json.dumps(envelope))
    return message_id


class LocalSource:
    """Consume `migctl:{pool}:intake` until `stop` is set."""

    def __init__(
        self,
        redis_client: redis.Redis,
        pool_id: str,
        intake: Intake,
        expected_pool: str,
        clock: Callable[[], float] = time.time,
        block_seconds: float = 1.0,
    ) -> None:
        self.redis = redis_client
        self.pool_id = pool_id
        self.block_seconds = block_seconds  # how often an idle consumer looks at `stop`
        self._counters = Counters()
        self._handler = Handler(intake, expected_pool, self._counters, clock)
        self._requeue = redis_client.register_script(_REQUEUE)
        self._queue = intake_key(pool_id)
        self._processing = processing_key(pool_id)

    def stats(self) -> dict[str, Any]:
        return self._counters.snapshot()

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set; the item in hand is finished first."""
        self._with_retry(stop, self._recover, "recovering the processing list")
        delay = _REDIS_RETRY_FIRST
        while not stop.is_set():
            try:
                # Redis >= 6 takes fractional seconds; redis-py's hint says int.
                raw = self.redis.blmove(
                    self._queue,
                    self._processing,
                    self.block_seconds,  # type: ignore[arg-type]
                    "RIGHT",
                    "LEFT",
                )
            except redis.RedisError as exc:
                log.warning(
                    "local source: %s unreadable (%s); retrying in %.1f s", self._queue, exc, delay
                )
                stop.wait(delay)
                delay = min(delay * 2, _REDIS_RETRY_CAP)
                continue
            delay = _REDIS_RETRY_FIRST
            if raw is not None:
                self._process(raw, stop)

    def _recover(self) -> None:
        left = self.redis.lrange(self._processing, 0, -1)
        # Newest first; RPUSHing in that order leaves the oldest at the consuming end.
        for raw in left:
            self._requeue(keys=[self._processing, self._queue], args=[raw, _next_attempt(raw)])
        if left:
            log.warning(
                "local source: moved %d unfinished messages back to %s", len(left), self._queue
            )

    def _process(self, raw: Raw, stop: threading.Event) -> None:
        # `raw` stays as Redis returned it: LREM must match the stored value exactly.
        data = raw.encode() if isinstance(raw, str) else raw
        try:
            envelope = _Envelope.decode(data)
        except ValueError as exc:
            message_id = "local-" + hashlib.sha256(data).hexdigest()[:16]
            self._counters.received(self._handler.clock())
            decision = self._handler.reject(data, {}, message_id, f"envelope: {exc}")
        else:
            decision = self._handler.handle(
                envelope.data, envelope.attributes, envelope.id, envelope.attempt + 1
            )
        if decision.verdict is Verdict.ACK:
            self._with_retry(stop, lambda: self._ack(raw), "ack")
            self._counters.incr("acked")
        else:
            self._nack(raw, decision, stop)

    def _ack(self, raw: Raw) -> None:
        self.redis.lrem(self._processing, 1, raw)  # type: ignore[arg-type]  # bytes work too

    def _nack(self, raw: Raw, decision: Decision, stop: threading.Event) -> None:
        if decision.delay > 0:
            stop.wait(min(decision.delay, MAX_NACK_DELAY))
        self._with_retry(
            stop,
            lambda: self._requeue(
                keys=[self._processing, self._queue], args=[raw, _next_attempt(raw)]
            ),
            "nack",
        )
        self._counters.incr("nacked")

    def _with_retry(self, stop: threading.Event, op: Callable[[], object], what: str) -> None:
        # Until it succeeds or we stop; a stopped item stays in `processing` for the next start.
        delay = _REDIS_RETRY_FIRST
        while True:
            try:
                op()
                return
            except redis.RedisError as exc:
                log.warning("local source: %s failed (%s); retrying in %.1f s", what, exc, delay)
                if stop.wait(delay):
                    return
                delay = min(delay * 2, _REDIS_RETRY_CAP)


class _Envelope:
    __slots__ = ("attempt", "attributes", "data", "id")

    def __init__(self, data: bytes, attributes: dict[str, str], id: str, attempt: int) -> None:
        self.data, self.attributes, self.id, self.attempt = data, attributes, id, attempt

    @classmethod
    def decode(cls, raw: bytes) -> _Envelope:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON: {str(exc)[:120]}") from None
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        message_id, attributes, attempt = (
            body.get("id"),
            body.get("attributes") or {},
            body.get("attempt", 0),
        )
        if not isinstance(message_id, str) or not message_id:
            raise ValueError("id: expected a non-empty string")
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise ValueError("attributes: expected an object of strings")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
            attempt = 0
        try:
            data = base64.b64decode(body.get("data", ""), validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise ValueError(f"data: not base64 ({exc})") from None
        return cls(data, attributes, message_id, attempt)


def _next_attempt(raw: Raw) -> Raw:
    """The envelope with `attempt` + 1 (it counts deliveries, as Pub/Sub's delivery_attempt)."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            attempt = body.get("attempt", 0)
            body["attempt"] = (attempt if isinstance(attempt, int) else 0) + 1
            return json.dumps(body).encode()
    except (ValueError, RecursionError):
        pass
    return raw
