"""GCE instance identity tokens: verified with google-auth against cached Google certs.

A VM mints a token at its metadata server (`.../identity?audience=AUD&format=full`),
a JWT signed by Google whose `google.compute_engine` claims name the instance, project
and zone. google-auth's `verify_token` fetches the certs on every call; here the fetch
goes through `CachingRequest`, so a reconnect storm of thousands of VMs costs one fetch.
Each token is accepted once: the caller's `first_use` (a Redis SET NX kept until the
token expires) refuses a replay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import google.auth.exceptions
import google.auth.transport
import google.auth.transport.requests
from google.oauth2 import id_token

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
# Google serves its certs with max-age of hours; an hour bounds how long a revoked key
# is trusted here. A token signed by a key we do not have yet refreshes sooner.
CERTS_TTL_S = 3600.0
CERTS_MIN_REFRESH_S = 60.0
CERTS_FETCH_TIMEOUT_S = 10.0
CLOCK_SKEW_S = 30


class IdentityRefused(Exception):
    """The token does not prove this VM. `retryable`: Google's certs were unreachable."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class _Cached(google.auth.transport.Response):
    _status: int
    _headers: Mapping[str, str]
    _data: bytes
    fetched: float
    expires: float

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def data(self) -> bytes:
        return self._data


class CachingRequest(google.auth.transport.Request):
    """A google-auth transport that keeps GET answers (the certs) for a TTL.

    One fetch at a time (the others wait for its answer); on a failed refresh the stale
    answer is used rather than refusing every VM while Google is unreachable.
    """

    def __init__(
        self,
        inner: google.auth.transport.Request | None = None,
        ttl: float = CERTS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner or google.auth.transport.requests.Request()
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        self.fetches = 0

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> google.auth.transport.Response:
        if method != "GET" or body is not None:
            answer: google.auth.transport.Response = self._inner(
                url, method, body, headers, timeout, **kwargs
            )
            return answer
        with self._lock:
            now = self._clock()
            hit = self._cache.get(url)
            if hit is not None and now < hit.expires:
                return hit
            try:
                fetched = self._inner(url, "GET", None, headers, timeout or CERTS_FETCH_TIMEOUT_S)
                self.fetches += 1
            except google.auth.exceptions.TransportError:
                if hit is not None:
                    log.warning("could not refresh %s; using the copy from before", url)
                    return hit
                raise
            if fetched.status != 200:
                return hit if hit is not None else fetched
            ttl = min(self._ttl, _max_age(fetched.headers) or self._ttl)
            entry = _Cached(fetched.status, dict(fetched.headers), fetched.data, now, now + ttl)
            self._cache[url] = entry
            return entry

    def keys(self, url: str) -> Mapping[str, Any]:
        with self._lock:
            hit = self._cache.get(url)
        return json.loads(hit.data) if hit is not None else {}

    def expire(self, url: str, min_age: float = CERTS_MIN_REFRESH_S) -> None:
        """Make the next call fetch again, unless the copy is younger than `min_age`."""
        with self._lock:
            hit = self._cache.get(url)
            if hit is not None and self._clock() - hit.fetched >= min_age:
                del self._cache[url]


class IdentityVerifier:
    """Checks a GCE instance identity token against the VM that presents it."""

    def __init__(
        self,
        audience: str,
        project_id: str = "",
        zone: str = "",
        *,
        first_use: Callable[[str, float], bool] | None = None,
        certs_url: str = GOOGLE_CERTS_URL,
        request: CachingRequest | None = None,
        clock_skew: int = CLOCK_SKEW_S,
    ) -> None:
        if not audience:
            raise ValueError("an identity audience is required")
        self.audience = audience
        self.project_id = project_id
        self.zone = zone
        self.first_use = first_use
        self.certs_url = certs_url
        self.request = request or CachingRequest()
        self.clock_skew = clock_skew

    def verify(self, token: str, vm_id: str) -> Mapping[str, Any]:
        """The token's claims, or IdentityRefused. Blocking (certs fetch, `first_use`)."""
        if not token:
            raise IdentityRefused("no_credentials", "a GCE identity token is required")
        kid = _kid(token)
        if kid and kid not in self.request.keys(self.certs_url):
            self.request.expire(self.certs_url)  # a key Google rotated in since our fetch
        try:
            claims = id_token.verify_token(
                token,
                self.request,
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=self.clock_skew,
            )
        except google.auth.exceptions.TransportError as exc:
            raise IdentityRefused(
                "identity_unverifiable", f"cannot verify identity now: {exc}", retryable=True
            ) from exc
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            text = str(exc).replace(token, "<token>")  # never echo a credential
            reason = "identity_expired" if "expired" in text.lower() else "identity_invalid"
            raise IdentityRefused(reason, f"identity token rejected: {text[:200]}") from exc
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise IdentityRefused("identity_invalid", "identity token not issued by Google")
        gce = (claims.get("google") or {}).get("compute_engine") or {}
        if not gce:
            raise IdentityRefused(
                "identity_invalid", "identity token without instance claims (format=full)"
            )
        if gce.get("instance_name") != vm_id:
            raise IdentityRefused(
                "identity_mismatch",
                f"identity token is for instance {gce.get('instance_name')!r}, not {vm_id!r}",
            )
        for claim, want in (("project_id", self.project_id), ("zone", self.zone)):
            if want and gce.get(claim) != want:
                raise IdentityRefused(
                    "identity_mismatch", f"instance {claim} {gce.get(claim)!r} is not {want!r}"
                )
        if self.first_use is not None:
            digest = hashlib.sha256(token.encode()).hexdigest()
            if not self.first_use(digest, float(claims["exp"]) + self.clock_skew):
                raise IdentityRefused("identity_replayed", "identity token already used")
        return claims


def _kid(token: str) -> str:
    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        return str(header.get("kid", "")) if isinstance(header, dict) else ""
    except (ValueError, binascii.Error):
        return ""


def _max_age(headers: Mapping[str, str]) -> float:
    for name, value in headers.items():
        if name.lower() == "cache-control":
            for part in value.split(","):
                key, _, number = part.strip().partition("=")
                if key == "max-age" and number.isdigit():
                    return float(number)
    return 0.0
