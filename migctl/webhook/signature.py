"""GitHub's delivery signature: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`."""

from __future__ import annotations

import hashlib
import hmac
import re

HEADER = "X-Hub-Signature-256"
_FORMAT = re.compile(r"sha256=[0-9a-fA-F]{64}")


def sign(secret: bytes, body: bytes) -> str:
    """The header value GitHub sends for `body`: always over the raw bytes, never re-serialised."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def check(secret: bytes, body: bytes, header: str | None) -> tuple[str, str] | None:
    """None when `header` is GitHub's signature of `body` under `secret`; else
    `(reason, detail)`, reason being `missing_signature` or `bad_signature`."""
    if not header:
        return "missing_signature", f"no {HEADER} header (is a secret set on the webhook?)"
    value = header.strip()
    if not _FORMAT.fullmatch(value):
        return "bad_signature", f"{HEADER} is not sha256=<64 hex digits>"
    # Constant time over equal-length ASCII; the case of the hex digits carries no meaning.
    if not hmac.compare_digest(value.lower().encode(), sign(secret, body).encode()):
        return "bad_signature", f"{HEADER} does not match the body (a different secret?)"
    return None
