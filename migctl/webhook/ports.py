"""The two ports of the webhook ingress: where deliveries go, and what it remembers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Publisher(Protocol):
    """Hands one delivery to the job pipeline (the Pub/Sub topic, or the local Redis source).

    Blocking, bounded by the publisher's own timeout (well inside GitHub's 10 s). Not
    idempotent: a retried call may publish twice, which the bridge absorbs (it dedupes on
    job id and action). Raises `TemporaryError` when the message may not have been taken.
    """

    max_bytes: int  # the largest body the destination carries

    def publish(self, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish and wait for the destination to confirm; returns its message id."""
        ...


class Ledger(Protocol):
    """Delivery ids already published, and counters. Blocking; every call raises
    `TemporaryError` when the store is unavailable."""

    def seen(self, delivery_id: str) -> bool:
        """Whether this delivery was published before (within the ledger's memory)."""
        ...

    def remember(self, delivery_id: str) -> bool:
        """Record a published delivery; False when it was already recorded (a race)."""
        ...

    def count(self, *names: str) -> None:
        """Add one to each counter named."""
        ...

    def counters(self) -> dict[str, int]: ...

    def claim(self, name: str, ttl_s: float) -> bool:
        """True for the first caller within `ttl_s` across replicas (periodic work)."""
        ...
