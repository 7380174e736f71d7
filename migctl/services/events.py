"""Applying what agents report: events, command acks and agent state changes.

Each handler reads the records involved, asks the domain for a `Change`, and writes it
with a compare on every revision; on a conflict it reads again, and after `ATTEMPTS`
conflicts raises TemporaryError for the caller to retry. A duplicate or late event finds
the records already moved on and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.domain import transitions as t
from migctl.domain.errors import TemporaryError
from migctl.domain.model import AgentState, Job, JobState, Vm
from migctl.domain.states import is_free
from migctl.faults import pause
from migctl.ports import Clock, Dispatcher, SystemClock
from migctl.settings import Settings

log = logging.getLogger(__name__)

ATTEMPTS = 8
VM_STARTUP_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)


def _contended(vm_id: str) -> TemporaryError:
    """Every attempt lost its compare-and-set: the caller retries later (a Celery task is
    retried, the gateway ends the stream for the agent to send again), nothing is lost."""
    return TemporaryError(f"VM {vm_id}: records changed under {ATTEMPTS} attempts", delay=0.2)


class AgentEvents:
    def __init__(
        self,
        store: RedisStore,
        settings: Settings,
        dispatch: Dispatcher,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.dispatch = dispatch
        self.clock = clock or SystemClock()
        self.max_retries = settings.scheduler.max_retries

    # -- entry points ---------------------------------------------------------------------

    def event(self, vm_id: str, kind: str, data: Mapping[str, str], at: float = 0.0) -> str:
        """One `EventNotification` from an agent, `at` its timestamp (0 = unknown).
        Returns what happened, for logs/tests."""
        job_id, run_id = t.event_job(data)
        if kind == "job_started" and job_id:
            return self._apply(
                vm_id,
                job_id,
                lambda vm, job, reserved, other: t.job_started(
                    vm, job, reserved=reserved, other_vm=other, run_id=run_id, now=self.clock.now()
                ),
            )
        if kind == "job_completed" and job_id:
            success = t.parse_bool(data.get("success", "false"))
            return self._apply(
                vm_id,
                job_id,
                lambda vm, job, reserved, other: t.job_completed(
                    vm,
                    job,
                    success=success,
                    reserved=reserved,
                    other_vm=other,
                    run_id=run_id,
                    now=self.clock.now(),
                ),
            )
        if kind == "runner_crashed":
            reason = data.get("reason", "unknown")

            def crashed(vm: Vm, running: Job | None, reserved: Job | None) -> t.Change:
                # The event names no runner: one older than the VM's latest registration
                # (a redelivered task, an outage) is about a runner already replaced.
                if at and vm.cmd_sent_at > at:
                    return t.Change(notes=[f"runner_crashed from {vm.id} predates its runner"])
                return t.runner_crashed(
                    vm,
                    running,
                    reserved,
                    now=self.clock.now(),
                    max_retries=self.max_retries,
                    reason=reason,
                )

            return self._apply_vm(vm_id, crashed)
        if kind == "runner_registered":
            # Informational: whether a runner is registered follows the agent's reported
            # state (idle/job_running), which the gateway writes in order. This event
            # travels through the queue and may arrive after the runner's job has already
            # completed: setting the flag from it would mark a VM with no runner as ready.
            got = self.store.get_vm(vm_id)
            if got and got[0].reserved_job:
                self.store.mark(got[0].reserved_job, registered_at=self.clock.now())
            return "noted"
        if kind in ("vm_started", "vm_shutting_down"):
            return "noted"
        log.warning("unknown event %r from %s ignored", kind, vm_id)
        return "ignored"

    def command_acked(self, vm_id: str, command_id: str, success: bool, message: str) -> str:
        return self._apply_vm(
            vm_id,
            lambda vm, running, reserved: t.command_acked(
                vm,
                reserved,
                command_id=command_id,
                success=success,
                message=message,
                now=self.clock.now(),
                max_retries=self.max_retries,
            ),
        )

    def agent_state(
        self,
        vm_id: str,
        state: AgentState,
        capabilities: tuple[str, ...] | None = None,
        session: str = "",
        holds: Callable[[], bool] | None = None,
    ) -> str:
        """The agent's reported state changed (or it connected).

        With `session`, the report came over that stream and counts only while the VM is
        recorded on it: a report written after its stream's disconnect must not mark the
        VM connected again, nor one from a stream the VM has left for another replica.
        A record on no stream (its connect write lost with a Redis restart) takes the
        report, and the stream, if `holds()` says the caller still holds that stream.
        """
        now = self.clock.now()
        started: list[float] = []

        def update(vm: Vm) -> Vm:
            if session and vm.session != session:
                if vm.session or holds is None or not holds():
                    return vm
                vm = vm.with_(session=session)
            new = t.agent_reported(vm, state, now=now, capabilities=capabilities)
            if vm.start_requested_at and state in (AgentState.READY, AgentState.IDLE):
                # The VM we created or started is up and its agent ready: its startup time.
                started[:] = [now - vm.start_requested_at]
                new = new.with_(start_requested_at=0.0)
            return new

        result = self._update_vm(vm_id, update)
        if result == "applied" and started:
            self.store.observe("controller_vm_startup_seconds", started[0], VM_STARTUP_BUCKETS)
        return result

    def disconnected(self, vm_id: str, session: str) -> str:
        """The gateway lost the stream `session`; a newer stream keeps the VM connected."""
        return self._update_vm(
            vm_id, lambda vm: vm.with_(connected=False, session="") if vm.session == session else vm
        )

    # -- the read/decide/write loop --------------------------------------------------------

    def _apply(
        self, vm_id: str, job_id: str, decide: Callable[[Vm, Job, Job | None, Vm | None], t.Change]
    ) -> str:
        for _ in range(ATTEMPTS):
            got_vm = self.store.get_vm(vm_id)
            if got_vm is None:
                log.warning("event for unknown VM %s (job %s) ignored", vm_id, job_id)
                return "unknown-vm"
            vm, vm_rev = got_vm
            revs = {f"vm:{vm.id}": vm_rev}
            got_job = self.store.get_job(job_id)
            if got_job is None:
                # GitHub handed us a job before its queued message arrived: record it now,
                # so the late message is a duplicate.
                job = Job(
                    id=job_id, labels=(), pool_id=self.store.pool_id, received_at=self.clock.now()
                )
            else:
                job, revs[f"job:{job_id}"] = got_job
            reserved = None
            if vm.reserved_job and vm.reserved_job != job_id:
                got = self.store.get_job(vm.reserved_job)
                if got:
                    reserved, revs[f"job:{got[0].id}"] = got
            other = None
            if job.state is JobState.ASSIGNED and job.vm_id and job.vm_id != vm_id:
                got_other = self.store.get_vm(job.vm_id)
                if got_other:
                    other, revs[f"vm:{job.vm_id}"] = got_other
            change = decide(vm, job, reserved, other)
            if self._write(change, revs):
                return "applied" if not change.empty else "noop"
        raise _contended(vm_id)

    def _apply_vm(
        self, vm_id: str, decide: Callable[[Vm, Job | None, Job | None], t.Change]
    ) -> str:
        for _ in range(ATTEMPTS):
            got_vm = self.store.get_vm(vm_id)
            if got_vm is None:
                return "unknown-vm"
            vm, vm_rev = got_vm
            revs = {f"vm:{vm.id}": vm_rev}
            running = reserved = None
            for attr in ("job_id", "reserved_job"):
                job_id = getattr(vm, attr)
                got = self.store.get_job(job_id) if job_id else None
                if got:
                    revs[f"job:{job_id}"] = got[1]
                    if attr == "job_id":
                        running = got[0]
                    else:
                        reserved = got[0]
            if self._write(decide(vm, running, reserved), revs):
                return "applied"
        raise _contended(vm_id)

    def _update_vm(self, vm_id: str, update: Callable[[Vm], Vm]) -> str:
        for _ in range(ATTEMPTS):
            got = self.store.get_vm(vm_id)
            if got is None:
                return "unknown-vm"
            vm, rev = got
            new = update(vm)
            if new == vm:
                return "noop"
            change = t.Change(vms={vm.id: new})
            if is_free(new) and not is_free(vm):
                change.freed.append(vm.id)
            if self._write(change, {f"vm:{vm.id}": rev}):
                return "applied"
        raise _contended(vm_id)

    def _write(self, change: t.Change, revs: dict[str, int]) -> bool:
        for note in change.notes:
            log.info("%s", note)
        if change.empty:
            return True
        counters: dict[str, int] = {}
        for job in change.jobs.values():
            if job.state is JobState.FAILED:
                counters["failed_jobs"] = counters.get("failed_jobs", 0) + 1
            if job.state is JobState.COMPLETED:
                counters["completed_jobs"] = counters.get("completed_jobs", 0) + 1
            if job.state is JobState.QUEUED and f"job:{job.id}" in revs:
                counters["requeued_jobs"] = counters.get("requeued_jobs", 0) + 1
        pause("events.before_save")
        try:
            self.store.save(change, revs, counters=counters)
        except Conflict:
            return False
        pause("events.after_save")
        for job_id in change.requeued:
            self.dispatch.assign_job(job_id)
        freed = set(change.freed) | {vm.id for vm in change.vms.values() if is_free(vm)}
        for vm_id in sorted(freed):
            self.dispatch.assign_vm(vm_id)
        return True
