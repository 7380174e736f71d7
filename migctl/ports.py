"""The narrow interfaces the services use. Each has a working fake in the package.

Adapters (`migctl.adapters`, `migctl.sim`) implement them; services receive them from
the composition root (`migctl.runtime`). Every call here may block on I/O; none waits
for the world to change (no call waits for a VM to boot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from migctl.domain.model import InfraStatus


@dataclass(frozen=True)
class ProviderVm:
    """One instance as the cloud reports it."""

    name: str
    status: InfraStatus
    created_at: float = 0.0
    detail: str = ""  # vendor status/action text, for people


class VmProvider(Protocol):
    """The MIG. Every mutating call takes a batch, is idempotent for the same names, and
    returns once the action is *scheduled* (GCE semantics): the next `list()` shows progress.

    Raises `TemporaryError` (incl. `CapacityExhausted`, `RateLimited`), `PermanentError`,
    and `NotFound` when none of the names exists.
    """

    def list(self) -> list[ProviderVm]:
        """Every instance of the group, whatever its state (one call, all pages)."""
        ...

    def create(self, names: Sequence[str]) -> None:
        """Create instances with these names (names are the VM ids)."""
        ...

    def start(self, names: Sequence[str]) -> None: ...

    def stop(self, names: Sequence[str]) -> None: ...

    def suspend(self, names: Sequence[str]) -> None: ...

    def resume(self, names: Sequence[str]) -> None: ...

    def delete(self, names: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class RunnerCredentials:
    """What an agent needs to register one runner. Secret: never log, never a task arg."""

    runner_url: str
    registration_token: str = field(default="", repr=False)
    jit_config: str = field(default="", repr=False)
    runner_group: str = ""
    expires_at: float = 0.0


@dataclass(frozen=True)
class RunnerInfo:
    id: int
    name: str
    status: str  # online / offline
    busy: bool
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueuedJob:
    """A job GitHub holds queued (from its REST API, not a webhook)."""

    job_id: str
    run_id: str
    repo: str  # owner/name
    labels: tuple[str, ...]


@dataclass(frozen=True)
class RunnerScope:
    """Where a runner registers: an org, or one repository (`owner/name`)."""

    org: str
    repo: str = ""
    installation_id: int = 0


class TokenIssuer(Protocol):
    """GitHub App side. Blocking HTTP; caches shared across workers.

    Raises `TemporaryError`/`RateLimited` (retry later) or `PermanentError` (bad key,
    app not installed).
    """

    def runner_credentials(
        self, scope: RunnerScope, runner_name: str, labels: Sequence[str], jit: bool
    ) -> RunnerCredentials:
        """A registration token (reused while valid) or, when `jit`, a one-runner JIT config."""
        ...

    def list_runners(self, scope: RunnerScope) -> list[RunnerInfo]: ...

    def queued_jobs(self, scope: RunnerScope) -> list[QueuedJob]:
        """Jobs GitHub holds queued in the scope's repositories (a lost queue's source)."""
        ...

    def delete_runner(self, scope: RunnerScope, runner_id: int) -> None:
        """Idempotent: a runner already gone is not an error."""
        ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        import time

        return time.time()


class Dispatcher(Protocol):
    """Starts follow-up work asynchronously (Celery tasks in production). Never blocks
    on the work itself; safe to call twice for the same id (the tasks are idempotent)."""

    def assign_job(self, job_id: str) -> None: ...

    def assign_vm(self, vm_id: str) -> None: ...

    def provision(self) -> None: ...
