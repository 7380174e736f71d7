"""One delivery in, one `Answer` out: verify, filter, dedupe, publish, remember.

No HTTP here (the server reads and writes the bytes), so every decision is a plain call.
The delivery id is remembered only once the publish succeeded, so a delivery that failed
(503) is published when GitHub redelivers it. Redis trouble never blocks a delivery: the
dedupe fails open, because the bridge dedupes again on job id and action.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from migctl.domain.errors import TemporaryError
from migctl.webhook.ports import Ledger, Publisher
from migctl.webhook.signature import check

log = logging.getLogger(__name__)

JOB_EVENT = "workflow_job"
# GitHub's delivery ids are GUIDs; anything else must not become part of a Redis key.
_DELIVERY_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
_JSON = ("application/json", "application/vnd.github+json")


@dataclass(frozen=True)
class Answer:
    """What to tell GitHub, and what to count."""

    status: int
    outcome: str  # accepted, duplicate, ignored or refused
    reason: str = ""  # why refused: missing_signature, bad_signature, too_large, ...
    detail: str = ""  # for a person reading GitHub's delivery log

    @property
    def counter(self) -> str:
        if self.outcome == "refused":
            return f"refused:{self.reason}"
        return "duplicates" if self.outcome == "duplicate" else self.outcome

    def body(self) -> dict[str, str]:
        fields = {"outcome": self.outcome, "reason": self.reason, "detail": self.detail}
        return {k: v for k, v in fields.items() if v}


def refused(status: int, reason: str, detail: str) -> Answer:
    return Answer(status, "refused", reason, detail)


class Ingress:
    """Thread-safe if its ports are; one per process."""

    def __init__(self, secret: bytes, publisher: Publisher, ledger: Ledger) -> None:
        if not secret:
            raise ValueError("the webhook secret must not be empty")
        self.secret = secret
        self.publisher = publisher
        self.ledger = ledger

    def receive(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """`headers` with lower-case names. Raises only what a port raises other than
        `TemporaryError`, i.e. on a bug."""
        answer, ledger_ok = self._decide(headers, body)
        if ledger_ok:
            try:
                self.ledger.count("received", answer.counter)
            except TemporaryError as exc:
                log.debug("webhook counters not written: %s", exc)
        return answer

    def count_refusal(self, answer: Answer) -> None:
        """Count an answer the server gave before a body existed (411, 413 on the header)."""
        try:
            self.ledger.count("received", answer.counter)
        except TemporaryError as exc:
            log.debug("webhook counters not written: %s", exc)

    def _decide(self, headers: Mapping[str, str], body: bytes) -> tuple[Answer, bool]:
        bad = check(self.secret, body, headers.get("x-hub-signature-256"))
        if bad is not None:
            return refused(401, *bad), True
        event = headers.get("x-github-event", "").strip()
        if not event:
            return refused(400, "missing_event", "no X-GitHub-Event header"), True
        if event != JOB_EVENT:
            return Answer(202, "ignored", detail=f"event {event!r} carries no job"), True
        delivery = headers.get("x-github-delivery", "").strip()
        if not _DELIVERY_ID.fullmatch(delivery):
            return refused(400, "bad_delivery", "X-GitHub-Delivery missing or not a GUID"), True
        media = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media not in _JSON:
            return refused(
                415, "unsupported_media_type", f"{media}: set the webhook's content type to JSON"
            ), True
        if len(body) > self.publisher.max_bytes:
            return refused(
                413, "too_large", f"{len(body)} bytes; the topic takes {self.publisher.max_bytes}"
            ), True
        ledger_ok = True
        try:
            if self.ledger.seen(delivery):
                return Answer(
                    202, "duplicate", detail=f"delivery {delivery} was published before"
                ), True
        except TemporaryError as exc:
            ledger_ok = False  # do not wait on Redis twice more in this request
            log.warning("webhook: dedupe unavailable (%s); publishing %s anyway", exc, delivery)
        attributes = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery}
        try:
            message_id = self.publisher.publish(body, attributes)
        except TemporaryError as exc:
            log.warning("webhook: delivery %s not published: %s", delivery, exc)
            return refused(503, "publish_failed", "the job topic did not take it; retry"), ledger_ok
        if ledger_ok:
            try:
                if not self.ledger.remember(delivery):
                    log.info("webhook: delivery %s was published twice at once", delivery)
            except TemporaryError as exc:
                ledger_ok = False
                log.warning("webhook: delivery %s published but not remembered: %s", delivery, exc)
        log.debug("webhook: delivery %s published as %s", delivery, message_id)
        return Answer(202, "accepted", detail=f"published as {message_id}"), ledger_ok
