"""Catch-up: GitHub never redelivers a failed webhook delivery by itself, so ask it to.

Lists the App webhook's recent deliveries (`GET /app/hook/deliveries`, App JWT) and asks
for one more attempt (`POST /app/hook/deliveries/{id}/attempts`) of each job delivery whose
attempts all failed. Which ones is a pure function of the list (`to_redeliver`); a
delivery is retried a bounded number of times, so a permanent fault never loops.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from migctl.adapters.github import (
    API_HEADERS,
    APP_HINTS,
    fail,
    json_answer,
    load_app_key,
    make_app_jwt,
    parse_time,
)
from migctl.domain.errors import PermanentError, RateLimited, TemporaryError
from migctl.settings import Settings

log = logging.getLogger(__name__)

LOOKBACK_S = 6 * 3600.0  # GitHub keeps 3 days; a pass every few minutes needs far less
MAX_ATTEMPTS = 3  # the original delivery and two redeliveries, then a person looks
MAX_PAGES = 50  # 5,000 deliveries a pass: a guard against a Link loop, not a real limit
TIMEOUT = (5.0, 15.0)  # connect, read
JOB_EVENTS = ("workflow_job",)
# 4xx answers a change on our side may cure: the secret (401), the path (404), slowness.
_RETRIABLE_4XX = (401, 404, 408, 429)


@dataclass(frozen=True)
class Delivery:
    """One attempt, as GitHub lists it; redeliveries share the original's `guid`."""

    id: int
    guid: str
    delivered_at: float
    status_code: int  # 0 when GitHub got no answer (timeout, connection refused)
    event: str
    redelivery: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def worth_retrying(status_code: int) -> bool:
    return not 400 <= status_code < 500 or status_code in _RETRIABLE_4XX


def to_redeliver(
    deliveries: Iterable[Delivery],
    since: float,
    max_attempts: int = MAX_ATTEMPTS,
    events: Iterable[str] = JOB_EVENTS,
) -> list[Delivery]:
    """The latest attempt of each delivery to redeliver, oldest first: a job event whose
    original attempt is at or after `since`, no attempt succeeded, fewer than
    `max_attempts` were made, and the last failure is worth retrying."""
    wanted = set(events)
    by_guid: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        by_guid[delivery.guid].append(delivery)
    chosen = []
    for attempts in by_guid.values():
        latest = max(attempts, key=lambda d: (d.delivered_at, d.id))
        originals = [d for d in attempts if not d.redelivery]
        if (
            latest.event in wanted
            # Without the original in the window, the count of attempts would be short.
            and originals
            and min(d.delivered_at for d in originals) >= since
            and not any(d.ok for d in attempts)
            and len(attempts) < max_attempts
            and worth_retrying(latest.status_code)
        ):
            chosen.append(latest)
    return sorted(chosen, key=lambda d: (d.delivered_at, d.id))


@dataclass
class Report:
    listed: int = 0
    redelivered: list[str] = field(default_factory=list)  # guids
    failed: list[str] = field(default_factory=list)  # "guid: why"

    def as_dict(self) -> dict[str, Any]:
        return {"listed": self.listed, "redelivered": self.redelivered, "failed": self.failed}


class AppHook:
    """GitHub's delivery endpoints of the App's webhook. Raises `TemporaryError`,
    `RateLimited` or `PermanentError`; never a `requests` error."""

    def __init__(
        self,
        base_url: str,
        app_id: str,
        key: rsa.RSAPrivateKey,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.app_id = app_id
        self.key = key
        self.session = session or requests.Session()
        self.clock = clock

    def recent(self, since: float) -> list[Delivery]:
        """Attempts delivered at or after `since`, newest first (pages until older ones)."""
        found: list[Delivery] = []
        url: str | None = self.base + "/app/hook/deliveries"
        params: dict[str, Any] | None = {"per_page": 100}
        for _ in range(MAX_PAGES):
            if url is None:
                break
            resp = self._call("GET", url, params)
            items = json_answer(resp, "GET /app/hook/deliveries", list, HOOK_HINTS)
            page = [_delivery(item) for item in items]
            found += [d for d in page if d.delivered_at >= since]
            if not page or min(d.delivered_at for d in page) < since:
                break
            url = resp.links.get("next", {}).get("url")
            params = None  # the Link URL carries the cursor and page size
        return found

    def redeliver(self, delivery_id: int) -> None:
        what = f"POST /app/hook/deliveries/{delivery_id}/attempts"
        resp = self._call("POST", f"{self.base}/app/hook/deliveries/{delivery_id}/attempts")
        if resp.status_code not in (200, 201, 202):
            fail(resp, what, HOOK_HINTS)

    def _call(self, method: str, url: str, params: Any = None) -> requests.Response:
        what = f"{method} {urlsplit(url).path}"
        headers = {
            **API_HEADERS,
            "Authorization": f"Bearer {make_app_jwt(self.app_id, self.key, self.clock())}",
        }
        try:
            resp = self.session.request(
                method, url, headers=headers, params=params, timeout=TIMEOUT
            )
        except requests.RequestException as exc:
            raise TemporaryError(f"GitHub {what}: {type(exc).__name__}") from exc
        if resp.status_code >= 500:
            raise TemporaryError(f"GitHub {what}: {resp.status_code}")
        if resp.status_code in (403, 429) and (
            resp.headers.get("Retry-After") or resp.headers.get("X-RateLimit-Remaining") == "0"
        ):
            after = resp.headers.get("Retry-After", "")
            raise RateLimited(
                f"GitHub {what}: rate limited", delay=float(after) if after.isdigit() else 60.0
            )
        return resp


def _delivery(item: Any) -> Delivery:
    try:
        return Delivery(
            id=int(item["id"]),
            guid=str(item["guid"]),
            delivered_at=parse_time(str(item["delivered_at"])),
            status_code=int(item.get("status_code") or 0),
            event=str(item.get("event") or ""),
            redelivery=bool(item.get("redelivery")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TemporaryError(f"GitHub deliveries: unexpected item ({type(exc).__name__})") from exc


# What to check when the App's webhook calls are refused.
HOOK_HINTS = {
    **APP_HINTS,
    403: "does the App have a webhook, and may it read its deliveries?",
    404: "is a webhook configured on the App?",
    422: "GitHub refused it (a delivery older than 3 days cannot be redelivered)",
}


def catch_up(
    hook: AppHook, now: float, lookback_s: float = LOOKBACK_S, max_attempts: int = MAX_ATTEMPTS
) -> Report:
    """One pass: list, choose, redeliver. A refused redelivery is reported and the pass goes
    on; `TemporaryError` (GitHub down, rate limited) ends it, for the next pass to retry."""
    since = now - lookback_s
    deliveries = hook.recent(since)
    report = Report(listed=len(deliveries))
    for delivery in to_redeliver(deliveries, since, max_attempts):
        try:
            hook.redeliver(delivery.id)
        except PermanentError as exc:
            report.failed.append(f"{delivery.guid}: {exc}")
            log.warning("catch-up: delivery %s not redelivered: %s", delivery.guid, exc)
            continue
        report.redelivered.append(delivery.guid)
        log.info(
            "catch-up: asked GitHub to redeliver %s (%s, last answer %s)",
            delivery.guid,
            delivery.event,
            delivery.status_code or "none",
        )
    return report


def app_hook(settings: Settings) -> AppHook:
    """The App's hook from the settings (`PermanentError` when the key is unusable)."""
    app = settings.github_app
    return AppHook(app.base_url, app.app_id, load_app_key(app))
