"""The one port the job sources (Pub/Sub bridge, local Redis list) hand events to."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Protocol

from migctl.bridge.messages import JobEvent

# The counters every job source keeps and publishes (`/stats`, the bridge_* metrics).
SOURCE_COUNTERS = (
    "received",
    "acked",
    "nacked",
    "duplicates",
    "dead_lettered",
    "created",
    "updated",
    "ignored",
    "errors",
)


class Outcome(StrEnum):
    """What `Intake.accept` did with an event; every outcome means "durable, ack it"."""

    CREATED = "created"  # a new job was stored and its assignment enqueued
    DUPLICATE = "duplicate"  # this (job_id, action) was seen before; nothing changed
    UPDATED = "updated"  # a known job moved on (in_progress, completed, ...)
    IGNORED = "ignored"  # valid but not ours to act on (e.g. completed for an unknown job)


class Intake(Protocol):
    """Where validated job events go. Blocking calls; safe to call from several threads.

    Raises `migctl.domain.errors.TemporaryError` when the store is unavailable: the caller
    nacks and the message comes back. Any other exception is a bug.
    """

    def accept(self, event: JobEvent) -> Outcome:
        """Persist the event idempotently on (job_id, action) and enqueue the work it implies.

        Returns only once the result is durable, so the caller may ack afterwards. A
        redelivered event returns `DUPLICATE` and enqueues nothing new.
        """
        ...

    def dead_letter(
        self, raw: bytes, attributes: Mapping[str, str], reason: str, message_id: str
    ) -> None:
        """Keep a message that can never be processed, with the reason, for a person.

        Idempotent on `message_id` (a lost ack means the same message may be refused twice).
        Raises `TemporaryError` when the store is unavailable.
        """
        ...
