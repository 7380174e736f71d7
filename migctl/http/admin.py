"""The admin writes: drain a VM, cancel a job. Used by the HTTP API and the CLI.

Each reads the records, lets the domain (or the pool's own drain) decide, and saves with
a compare on every revision, retrying on a conflict, like the services do. Refusals are
`AdminError`s carrying the HTTP status and a sentence for people.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.domain import transitions as t
from migctl.domain.errors import PermanentError
from migctl.domain.model import Job, JobState, Lifecycle
from migctl.domain.states import is_free
from migctl.ports import Dispatcher, ProviderVm
from migctl.services.pool import Pool
from migctl.settings import Settings

log = logging.getLogger(__name__)

ATTEMPTS = 5


class AdminError(Exception):
    """An admin request refused: `status` is the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Drained:
    vm_id: str
    command_id: str
    already: bool = False


@dataclass(frozen=True)
class Cancelled:
    job: Job
    freed: tuple[str, ...]


class _NoProvider:
    """Draining only writes Redis; the provider is the idle pass's business."""

    def _refuse(self, *_: object) -> None:
        raise PermanentError("the admin API does not call the VM provider")

    def list(self) -> list[ProviderVm]:
        raise PermanentError("the admin API does not call the VM provider")

    def create(self, names: Sequence[str]) -> None:
        self._refuse(names)

    def start(self, names: Sequence[str]) -> None:
        self._refuse(names)

    def stop(self, names: Sequence[str]) -> None:
        self._refuse(names)

    def suspend(self, names: Sequence[str]) -> None:
        self._refuse(names)

    def resume(self, names: Sequence[str]) -> None:
        self._refuse(names)

    def delete(self, names: Sequence[str]) -> None:
        self._refuse(names)


class _NoDispatch:
    def assign_job(self, job_id: str) -> None: ...

    def assign_vm(self, vm_id: str) -> None: ...

    def provision(self) -> None: ...


def drain_vm(store: RedisStore, settings: Settings, vm_id: str, now: float) -> Drained:
    """Mark a free VM DRAINING and put `drain` in its outbox, as the idle pass does; the
    agent removes its runner and acks, then the idle pass stops the VM (pool.idle_action)."""
    for _ in range(ATTEMPTS):
        got = store.get_vm(vm_id)
        if got is None:
            raise AdminError(404, f"no VM {vm_id} in pool {store.pool_id}")
        vm = got[0]
        if vm.lifecycle is Lifecycle.DRAINING:
            return Drained(vm.id, vm.cmd_id, already=True)
        if not is_free(vm):
            holds = (
                f" (running job {vm.job_id})"
                if vm.job_id
                else f" (reserved for job {vm.reserved_job})"
                if vm.reserved_job
                else " (a registration is in flight)"
                if vm.cmd_id
                else ""
            )
            raise AdminError(
                409,
                f"VM {vm_id} is {vm.state.value}{holds}: only a free (READY or IDLE) VM can "
                "be drained; wait for its job, or cancel it first",
            )
        pool = Pool(store, _NoProvider(), settings, _NoDispatch())
        if pool.drain([vm_id], now, reason="operator request"):
            after = store.get_vm(vm_id)
            command_id = after[0].cmd_id if after else ""
            log.info("VM %s draining on an operator's request", vm_id)
            return Drained(vm_id, command_id)
    raise AdminError(409, f"VM {vm_id} kept changing while being drained; try again")


def cancel_job(
    store: RedisStore,
    job_id: str,
    *,
    reason: str,
    now: float,
    dispatch: Dispatcher | None = None,
) -> Cancelled:
    """End a job CANCELLED (the demand it holds is released; a VM reserved for it goes
    back to the pool). It does not cancel the workflow run on GitHub."""
    for _ in range(ATTEMPTS):
        got = store.get_job(job_id)
        if got is None:
            raise AdminError(404, f"no job {job_id} in pool {store.pool_id}")
        job, rev = got
        if job.state.terminal:
            raise AdminError(409, f"job {job_id} is already {job.state.value}; nothing to cancel")
        revs = {f"job:{job.id}": rev}
        vm = None
        if job.vm_id and (got_vm := store.get_vm(job.vm_id)):
            vm, revs[f"vm:{job.vm_id}"] = got_vm
        change = t.job_ended_elsewhere(
            job,
            vm,
            state=JobState.CANCELLED,
            reason=f"cancelled by an operator: {reason}" if reason else "cancelled by an operator",
            conclusion="cancelled",
            now=now,
        )
        try:
            store.save(change, revs, counters={"cancelled_jobs": 1})
        except Conflict:
            continue
        log.info("job %s cancelled by an operator (%s)", job_id, reason or "no reason given")
        for freed in change.freed:
            try:
                if dispatch is not None:
                    dispatch.assign_vm(freed)
            except Exception as exc:  # the queue sweep gives the VM work anyway
                log.warning("could not dispatch assign_vm for %s: %s", freed, exc)
        return Cancelled(change.jobs[job_id], tuple(change.freed))
    raise AdminError(409, f"job {job_id} kept changing while being cancelled; try again")
