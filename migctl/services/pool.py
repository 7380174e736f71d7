"""Level-triggered pool reconcilers: provision, cloud sync, health and queue sweeps, idle stop.

Each observes (Redis and the provider), lets the domain decide, and acts; each runs
under a per-pool lock with a TTL, so running it twice or concurrently is safe.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.domain import transitions as t
from migctl.domain.errors import CapacityExhausted, MigctlError, NotFound, TemporaryError
from migctl.domain.model import InfraStatus, JobState, Lifecycle, Vm
from migctl.domain.scheduler import Defer, ScaleUp, StartStopped, provision
from migctl.domain.states import is_free
from migctl.ports import Clock, Dispatcher, SystemClock, VmProvider
from migctl.services.assignment import limits_of
from migctl.settings import Settings

log = logging.getLogger(__name__)

# A VM the controller created may not be listed by the MIG for a moment; do not call
# it lost before this.
LIST_GRACE_S = 60.0


@dataclass
class Report:
    actions: dict[str, list[str]] = field(default_factory=dict)
    detail: str = ""

    def add(self, action: str, ids: Sequence[str]) -> None:
        if ids:
            self.actions.setdefault(action, []).extend(ids)


class Pool:
    def __init__(
        self,
        store: RedisStore,
        provider: VmProvider,
        settings: Settings,
        dispatch: Dispatcher,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings
        self.dispatch = dispatch
        self.clock = clock or SystemClock()
        self.limits = limits_of(settings)

    # -- provisioning --------------------------------------------------------------------

    def provision(self) -> Report:
        """Bring capacity to queued demand plus the warm pool: resume, start, then create."""
        with self.store.try_lock("provision", timeout=120, wait=30) as got:
            if not got:
                raise TemporaryError("another provisioning pass holds the lock", delay=1.0)
            return self._provision()

    def _provision(self) -> Report:
        report = Report()
        now = self.clock.now()
        vms = [vm for vm, _ in self.store.get_vms()]
        demand = self.store.queue_length() + self.settings.vm_manager.min_ready_vms
        decision = provision(demand, vms, self.limits, self.store.scaled_since(now - 60))
        if isinstance(decision, Defer):
            report.detail = decision.reason
            return report
        if isinstance(decision, StartStopped):
            self._wake(decision.resume, "resume", report)
            self._wake(decision.start, "start", report)
            create = decision.then_create
        else:
            assert isinstance(decision, ScaleUp)
            create = decision.count
        if create:
            self._create(create, report)
        return report

    def _wake(self, ids: Sequence[str], how: str, report: Report) -> None:
        if not ids:
            return
        now = self.clock.now()
        marked = self._mark(
            ids,
            lambda vm: vm.with_(
                lifecycle=Lifecycle.STARTING, state_since=now, infra=InfraStatus.STARTING
            ),
        )
        if not marked:
            return
        try:
            (self.provider.resume if how == "resume" else self.provider.start)(marked)
        except MigctlError as exc:
            self._mark(marked, lambda vm: vm.with_(lifecycle=Lifecycle.NONE))
            self._provider_failed(how, exc)
            return
        self.store.record_scaled(marked, now)
        self.store.incr("started_vms", len(marked))
        report.add(how, marked)

    def _create(self, count: int, report: Report) -> None:
        now = self.clock.now()
        base = self.settings.gcp.mig_name or self.settings.pool.id
        names = [f"{base}-{secrets.token_hex(3)}" for _ in range(count)]
        labels = tuple(self.settings.pool.labels)
        change = t.Change()
        for name in names:
            change.vm(
                Vm(
                    id=name,
                    labels=labels,
                    infra=InfraStatus.CREATING,
                    lifecycle=Lifecycle.STARTING,
                    created_at=now,
                    state_since=now,
                )
            )
        self.store.save(change, {})
        try:
            self.provider.create(names)
        except MigctlError as exc:
            self.store.save(t.Change(), {f"vm:{n}": 1 for n in names}, deleted_vms=names)
            self._provider_failed("create", exc)
            return
        self.store.record_scaled(names, now)
        self.store.incr("created_vms", len(names))
        report.add("create", names)

    def _provider_failed(self, action: str, exc: MigctlError) -> None:
        kind = type(exc).__name__
        self.store.incr(f"provider_errors_{kind}")
        if isinstance(exc, CapacityExhausted):
            self.store.incr("capacity_exhausted")
            log.warning("%s: out of capacity, jobs stay queued: %s", action, exc)
        elif isinstance(exc, TemporaryError):
            log.warning("%s failed, will retry: %s", action, exc)
        else:
            log.error("%s failed permanently: %s", action, exc)

    # -- cloud sync ---------------------------------------------------------------------

    def sync(self) -> Report:
        """Align VM records with what the provider lists."""
        report = Report()
        with self.store.try_lock("sync", timeout=120) as got:
            if not got:
                report.detail = "another sync is running"
                return report
            listed = {pvm.name: pvm for pvm in self.provider.list()}
            now = self.clock.now()
            known = dict((vm.id, (vm, rev)) for vm, rev in self.store.get_vms())
            for name, pvm in listed.items():
                if name not in known:
                    vm = Vm(
                        id=name,
                        labels=tuple(self.settings.pool.labels),
                        infra=pvm.status,
                        created_at=pvm.created_at or now,
                        state_since=now,
                    )
                    self._save_vm(vm, 0)
                    report.add("discovered", [name])
                    continue
                vm, rev = known[name]
                new = _observe(vm, pvm.status, now)
                if new != vm and self._save_vm(new, rev):
                    report.add("updated", [name])
            for name, (vm, _rev) in known.items():
                if name in listed or now - vm.created_at < LIST_GRACE_S:
                    continue
                self._lose(name, "gone from the MIG")
                report.add("lost", [name])
        return report

    def _save_vm(self, vm: Vm, rev: int) -> bool:
        try:
            self.store.save(t.Change(vms={vm.id: vm}), {f"vm:{vm.id}": rev})
            return True
        except Conflict:
            return False

    def _lose(self, vm_id: str, why: str) -> None:
        for _ in range(5):
            got = self.store.get_vm(vm_id)
            if got is None:
                return
            vm, rev = got
            revs = {f"vm:{vm_id}": rev}
            jobs = {}
            for job_id in {vm.job_id, vm.reserved_job} - {""}:
                got_job = self.store.get_job(job_id)
                if got_job:
                    jobs[job_id], revs[f"job:{job_id}"] = got_job
            change = t.vm_lost(
                vm,
                jobs.get(vm.job_id),
                jobs.get(vm.reserved_job),
                now=self.clock.now(),
                max_retries=self.settings.scheduler.max_retries,
            )
            change.vms.pop(vm_id, None)
            try:
                self.store.save(change, revs, deleted_vms=[vm_id])
            except Conflict:
                continue
            log.warning("VM %s %s; %d job(s) requeued", vm_id, why, len(change.requeued))
            for job_id in change.requeued:
                self.dispatch.assign_job(job_id)
            return

    # -- sweeps --------------------------------------------------------------------------

    def sweep(self) -> Report:
        """Safety nets: assignment timeouts, silent agents, queued jobs nobody is serving."""
        report = Report()
        now = self.clock.now()
        sched, vmm = self.settings.scheduler, self.settings.vm_manager
        for job_id in self.store.assigned_before(now - sched.assignment_timeout):
            if self._timeout_assignment(job_id, now):
                report.add("assignment_timeout", [job_id])
        vms = self.store.get_vms()
        for vm, rev in vms:
            silent = (
                vm.connected
                and vm.last_heartbeat
                and now - vm.last_heartbeat > vmm.heartbeat_timeout
            )
            if silent and not vm.unhealthy and self._save_vm(vm.with_(unhealthy=True), rev):
                report.add("unhealthy", [vm.id])
            elif (
                vm.unhealthy
                and not silent
                and vm.connected
                and self._save_vm(vm.with_(unhealthy=False), rev)
            ):
                report.add("healthy", [vm.id])
        queued = self.store.queued(limit=100)
        free = [vm for vm, _ in vms if is_free(vm)]
        for job, _ in queued[: max(len(free), 1)]:
            self.dispatch.assign_job(job.id)
        if queued:
            self.dispatch.provision()
            report.add("kicked", [job.id for job, _ in queued[: max(len(free), 1)]])
        return report

    def _timeout_assignment(self, job_id: str, now: float) -> bool:
        for _ in range(5):
            got = self.store.get_job(job_id)
            if got is None or got[0].state is not JobState.ASSIGNED:
                return False
            job, job_rev = got
            revs = {f"job:{job_id}": job_rev}
            vm = None
            if job.vm_id and (got_vm := self.store.get_vm(job.vm_id)):
                vm, revs[f"vm:{vm.id}"] = got_vm
            change = t.assignment_timed_out(
                job, vm, now=now, max_retries=self.settings.scheduler.max_retries
            )
            try:
                self.store.save(change, revs, counters={"assignment_timeouts": 1})
            except Conflict:
                continue
            for jid in change.requeued:
                self.dispatch.assign_job(jid)
            for vid in change.freed:
                self.dispatch.assign_vm(vid)
            return True
        return False

    # -- idle stop -------------------------------------------------------------------------

    def idle_stop(self) -> Report:
        """Stop (or suspend/delete) free VMs idle past idle_timeout, above the warm pool."""
        report = Report()
        vmm = self.settings.vm_manager
        now = self.clock.now()
        with self.store.try_lock("idle", timeout=120) as got:
            if not got:
                return report
            free = sorted(
                (vm for vm, _ in self.store.get_vms() if is_free(vm)),
                key=lambda vm: -vm.last_active,
            )
            if self.store.queue_length():
                return report
            surplus = [
                vm for vm in free[vmm.min_ready_vms :] if now - vm.last_active > vmm.idle_timeout
            ]
            # An idle registered runner would be left behind offline in GitHub; those wait
            # for the drain path rather than being stopped under their runner.
            ids = [vm.id for vm in surplus if not vm.runner_registered]
            action = self.settings.pool.idle_action
            lifecycle = {
                "stop": Lifecycle.STOPPING,
                "suspend": Lifecycle.SUSPENDING,
                "delete": Lifecycle.DELETING,
            }[action]
            marked = self._mark(ids, lambda vm: vm.with_(lifecycle=lifecycle, state_since=now))
            if not marked:
                return report
            try:
                getattr(self.provider, action)(marked)
            except NotFound:
                pass
            except MigctlError as exc:
                self._mark(marked, lambda vm: vm.with_(lifecycle=Lifecycle.NONE))
                self._provider_failed(action, exc)
                return report
            self.store.incr(f"idle_{action}_vms", len(marked))
            report.add(action, marked)
        return report

    def _mark(self, ids: Sequence[str], update: object) -> list[str]:
        """Apply `update` to each VM with a compare; returns those written (a VM claimed
        meanwhile is skipped, so a stop never lands on a VM that just got a job)."""
        done = []
        for vm, rev in self.store.get_vms(ids):
            new = update(vm)  # type: ignore[operator]
            if self._save_vm(new, rev):
                done.append(vm.id)
        return done


def _observe(vm: Vm, status: InfraStatus, now: float) -> Vm:
    """Fold the provider's status into the record; a finished lifecycle step is cleared."""
    new = vm.with_(infra=status)
    if status != vm.infra:
        new = new.with_(state_since=now)
    done = {
        Lifecycle.STARTING: status is InfraStatus.RUNNING,
        Lifecycle.STOPPING: status in (InfraStatus.STOPPED, InfraStatus.GONE),
        Lifecycle.SUSPENDING: status is InfraStatus.SUSPENDED,
    }
    if done.get(vm.lifecycle):
        new = new.with_(lifecycle=Lifecycle.NONE)
    if status in (InfraStatus.STOPPED, InfraStatus.SUSPENDED) and not vm.connected:
        new = new.with_(agent=vm.agent.__class__.NONE, runner_registered=False, unhealthy=False)
    return new
