"""The controller's own error types. Adapters raise these, chaining the vendor's error.

Two retry classes, as in kopf: `TemporaryError` (try again after `delay`) and
`PermanentError` (do not retry; a person must act). Anything else is a bug.
"""

from __future__ import annotations


class MigctlError(Exception):
    """Base of every error migctl raises on purpose."""


class TemporaryError(MigctlError):
    """Worth retrying after `delay` seconds: rate limits, 5xx, timeouts, Redis blips."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(MigctlError):
    """Retrying will not help: bad credentials, permission denied, invalid request."""


class CapacityExhausted(TemporaryError):
    """The zone is out of this machine type or quota; jobs stay queued, the pool retries."""

    def __init__(self, message: str, delay: float = 60.0) -> None:
        super().__init__(message, delay)


class RateLimited(TemporaryError):
    """The remote API asked us to slow down; `delay` is its Retry-After when it gave one."""


class NotFound(MigctlError):
    """The thing is gone (a VM deleted out of band, a runner already removed)."""


class RunnerNameTaken(PermanentError):
    """GitHub already has a runner of that name (a JIT runner minted and never started)."""


class RunnerBusy(PermanentError):
    """GitHub refuses to delete a runner that is running a job."""
