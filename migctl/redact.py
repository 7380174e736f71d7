"""A logging filter for every handler: secrets redacted, pool/job/VM ids attached.

Redacts GitHub tokens (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_), JWT-looking strings
(and JIT configs, which are base64 JSON: `eyJ...`), values given as `token=`, `password=`,
`secret=`, `private_key=` and the like, bearer credentials, passwords in URLs and PEM
blocks, in the message, its arguments and any traceback. Ids come from `log_context`
(a contextvar, so threads and asyncio tasks each see their own), from `extra=`, or, as
a last resort, from the message ("job 123", "VM pool-2vcpu-ab12cd").
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

MASK = "[REDACTED]"
FIELDS = ("pool_id", "job_id", "vm_id")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A PEM block, or the rest of the text after an unterminated BEGIN line.
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.DOTALL),
        "[REDACTED PEM]",
    ),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,255}|github_pat_[A-Za-z0-9_]{20,255})"), MASK),
    # JWTs (eyJ header) and other base64 JSON blobs such as an encoded JIT config.
    (re.compile(r"\beyJ[A-Za-z0-9_\-+/=]{8,}(?:\.[A-Za-z0-9_\-+/=]*){0,2}"), MASK),
    # Credentials after an auth scheme: long, or with a digit (not "bearer tokens").
    (
        re.compile(r"(?i)\b((?:bearer|basic|token)\s+)(?:(?=\S*\d)\S{8,}|\S{20,})"),
        rf"\1{MASK}",
    ),
    # key=value, key: value, "key": "value" for secret-sounding keys.
    (
        re.compile(
            r"(?i)(\b[\w-]*(?:token|password|passwd|secret|private_key|jit_config|basic_auth"
            r"|api_key|credentials?)[\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;}\]]+)"
        ),
        rf"\1{MASK}",
    ),
    # redis://user:password@host, https://x-access-token:TOKEN@github.com
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)(@)"), rf"\1{MASK}\3"),
)

# Fallbacks when nothing set an id: the message's own words, conservatively.
_JOB_IN_TEXT = re.compile(r"\bjob (\d{3,20})\b")
_VM_IN_TEXT = re.compile(r"\b(?:VM|vm) ([a-z](?=[a-z0-9-]*[0-9-])[a-z0-9-]{2,62})\b")

_context: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("migctl_log_context", default=())


def redact(text: str) -> str:
    """The text with every secret-looking part replaced by a mask."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def bind(**ids: str) -> Token[tuple[tuple[str, str], ...]]:
    """Attach ids (pool_id, job_id, vm_id) to the records of this thread or task until
    `unbind(token)`; for hooks that open and close in two calls (Celery's task_prerun
    and task_postrun signals)."""
    merged = {**dict(_context.get()), **{k: str(v) for k, v in ids.items() if v}}
    return _context.set(tuple(merged.items()))


def unbind(token: Token[tuple[tuple[str, str], ...]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Attach ids (pool_id, job_id, vm_id) to every record logged inside the block."""
    token = bind(**ids)
    try:
        yield
    finally:
        unbind(token)


class ContextFilter(logging.Filter):
    """Redacts and annotates a record in place; never drops one. Idempotent."""

    def __init__(self, pool_id: str = "") -> None:
        super().__init__()
        self.pool_id = pool_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_migctl_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we can, redacted
            message = f"{record.msg} {record.args}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        ids = dict(_context.get())
        found = {name: str(getattr(record, name, "") or ids.get(name, "")) for name in FIELDS}
        found["pool_id"] = found["pool_id"] or self.pool_id
        if not found["job_id"] and (m := _JOB_IN_TEXT.search(record.msg)):
            found["job_id"] = m.group(1)
        if not found["vm_id"] and (m := _VM_IN_TEXT.search(record.msg)):
            found["vm_id"] = m.group(1)
        for name, value in found.items():
            setattr(record, name, value)
        record._migctl_redacted = True
        return True


def install(pool_id: str = "", logger: logging.Logger | None = None) -> ContextFilter:
    """Put one filter on every handler of `logger` (the root by default). Call again after
    a library replaces the handlers (Celery's `after_setup_logger` signal)."""
    target = logger or logging.getLogger()
    filt = ContextFilter(pool_id)
    for handler in target.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, ContextFilter)]
        handler.addFilter(filt)
    return filt
