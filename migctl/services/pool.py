"""Level-triggered pool reconcilers: provision, cloud sync, health and queue sweeps, idle stop.

Each observes (Redis and the provider), lets the domain decide, and acts; each runs
under a per-pool lock with a TTL, so running it twice or concurrently is safe.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from migctl.adapters.redis_store import Conflict, RedisStore
from migctl.domain import transitions as t
from migctl.domain.errors import CapacityExhausted, MigctlError, NotFound, TemporaryError
from migctl.domain.model import AgentState, InfraStatus, JobState, Lifecycle, Vm
from migctl.domain.policy import health_plan, idle_plan
from migctl.domain.scheduler import Defer, ScaleUp, StartStopped, provision
from migctl.domain.states import is_free
from migctl.ports import Clock, Dispatcher, SystemClock, VmProvider
from migctl.services.assignment import limits_of
from migctl.settings import Settings

log = logging.getLogger(__name__)

# A VM the controller created may not be listed by the MIG for a moment; do not call
# it lost before this.
LIST_GRACE_S = 60.0
# register_runner lives this long (a registration token's hour, less a margin).
COMMAND_LIFE_S = 3000.0
# An ASSIGNED job is looked at again after this, to finish a registration never sent.
STALE_ASSIGNMENT_S = 10.0
# GitHub fails a lost runner's job within minutes; a RUNNING job whose VM was lost and
# still has no word from GitHub after this lost its `completed` too: it ends FAILED.
LOST_JOB_S = 1800.0


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
        if not self.store.synced_at():
            # No VM records to trust yet (a first start, or Redis lost its data): list
            # the provider first, or the pool would be scaled past max_vms blind.
            self.sync()
            if not self.store.synced_at():
                raise TemporaryError("waiting for the first GCloud sync", delay=1.0)
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
                lifecycle=Lifecycle.STARTING,
                state_since=now,
                infra=InfraStatus.STARTING,
                start_requested_at=now,
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
                    start_requested_at=now,
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
            self._keep_standby_policy(report)
            listed = {pvm.name: pvm for pvm in self.provider.list()}
            now = self.clock.now()
            known = dict((vm.id, (vm, rev)) for vm, rev in self.store.get_vms())
            items: list[tuple[t.Change, dict[str, int]]] = []
            kinds: list[tuple[str, str]] = []
            for name, pvm in listed.items():
                if name not in known:
                    vm = Vm(
                        id=name,
                        labels=tuple(self.settings.pool.labels),
                        infra=pvm.status,
                        created_at=pvm.created_at or now,
                        state_since=now,
                    )
                    items.append((t.Change(vms={name: vm}), {}))
                    kinds.append(("discovered", name))
                    continue
                vm, rev = known[name]
                new = _observe(vm, pvm.status, now)
                if new != vm:
                    items.append((t.Change(vms={name: new}), {f"vm:{name}": rev}))
                    kinds.append(("updated", name))
            for (kind, name), ok in zip(kinds, self.store.save_many(items), strict=True):
                if ok:
                    report.add(kind, [name])
                elif kind == "updated" and self._observe_again(name, listed[name].status, now):
                    # Its record changed under us (an event): fold the listing in again,
                    # or a VM that vanishes before the next pass keeps a stale status.
                    report.add(kind, [name])
            for name, (vm, _rev) in known.items():
                if name in listed or now - vm.created_at < LIST_GRACE_S:
                    continue
                self._lose(name, "gone from the MIG")
                report.add("lost", [name])
            self.store.mark_synced(now)
        return report

    def _observe_again(self, vm_id: str, status: InfraStatus, now: float) -> bool:
        for _ in range(3):
            got = self.store.get_vm(vm_id)
            if got is None:
                return False
            vm, rev = got
            new = _observe(vm, status, now)
            if new == vm:
                return False
            if self._save_vm(new, rev):
                return True
        return False

    def _keep_standby_policy(self, report: Report) -> None:
        """Where configured, hold the MIG's standby policy (mode, initial delay) as set."""
        gcp = self.settings.gcp
        want_delay = gcp.standby_initial_delay
        if not gcp.standby_mode and want_delay is None:
            return
        standby = getattr(self.provider, "standby", None)
        if standby is None:
            return  # the provider has no standby pool (the simulator)
        current = standby()
        mode = gcp.standby_mode or None
        delay = int(want_delay) if want_delay is not None else None
        if (mode is None or current.mode == mode) and (
            delay is None or current.initial_delay_sec == delay
        ):
            return
        self.provider.set_standby(mode=mode, initial_delay_sec=delay)  # type: ignore[attr-defined]
        report.add("standby_policy", [f"mode={mode or current.mode} initial_delay_sec={delay}"])

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
        """Safety nets: assignment timeouts, silent or stuck VMs, queued jobs nobody serves."""
        report = Report()
        now = self.clock.now()
        sched, vmm = self.settings.scheduler, self.settings.vm_manager
        for job_id in self.store.assigned_before(now - sched.assignment_timeout):
            if self._timeout_assignment(job_id, now):
                report.add("assignment_timeout", [job_id])
        for job_id in self.store.lost_before(now - LOST_JOB_S)[:100]:
            if self._expire_lost(job_id, now):
                report.add("lost_job_expired", [job_id])
        # A command no agent acked within its life (the agent restarted after it expired,
        # so no reconnect replays it): fail it like a refused ack, or the VM is never free.
        for vm_id in self.store.inflight_before(now - COMMAND_LIFE_S):
            self._expire_command(vm_id, now)
            report.add("command_expired", [vm_id])
        # An assignment whose registration was never sent (a worker died after the claim,
        # or a reservation moved onto a VM meanwhile): assign_job finishes it, idempotently.
        stale = self.store.assigned_before(now - STALE_ASSIGNMENT_S)[:100]
        for job_id in stale:
            self.dispatch.assign_job(job_id)
        vms = self.store.get_vms()
        plan = health_plan(
            [vm for vm, _ in vms],
            now,
            heartbeat_timeout=vmm.heartbeat_timeout,
            boot_timeout=vmm.boot_timeout,
        )
        for vm_id in plan.unhealthy:
            log.warning("VM %s is UNHEALTHY: %s", vm_id, plan.reasons.get(vm_id, ""))
        report.add("unhealthy", self._mark(plan.unhealthy, lambda vm: vm.with_(unhealthy=True)))
        report.add("healthy", self._mark(plan.healthy, lambda vm: vm.with_(unhealthy=False)))
        if plan.replace:
            for vm_id in plan.replace:
                log.warning("replacing VM %s: %s", vm_id, plan.reasons.get(vm_id, ""))
            report.add("replace", self.replace(plan.replace, "replaced"))
        queued = self.store.queued(limit=100)
        free = [vm for vm, _ in vms if is_free(vm)]
        for job, _ in queued[: max(len(free), 1)]:
            self.dispatch.assign_job(job.id)
        if queued:
            self.dispatch.provision()
            report.add("kicked", [job.id for job, _ in queued[: max(len(free), 1)]])
        return report

    def replace(self, ids: Sequence[str], why: str) -> list[str]:
        """Delete these VMs (their jobs go back to the queue, bounded); provisioning
        brings new capacity when demand or the warm pool needs it."""
        now = self.clock.now()
        marked = []
        for vm_id in ids:
            for _ in range(5):
                got = self.store.get_vm(vm_id)
                if got is None:
                    break
                vm, rev = got
                revs = {f"vm:{vm_id}": rev}
                jobs = {}
                for job_id in {vm.job_id, vm.reserved_job} - {""}:
                    if got_job := self.store.get_job(job_id):
                        jobs[job_id], revs[f"job:{job_id}"] = got_job
                change = t.vm_lost(
                    vm,
                    jobs.get(vm.job_id),
                    jobs.get(vm.reserved_job),
                    now=now,
                    max_retries=self.settings.scheduler.max_retries,
                )
                lost = change.vms[vm_id]
                change.vm(lost.with_(lifecycle=Lifecycle.DELETING, state_since=now))
                try:
                    self.store.save(change, revs, counters={f"{why}_vms": 1})
                except Conflict:
                    continue
                marked.append(vm_id)
                for job_id in change.requeued:
                    self.dispatch.assign_job(job_id)
                break
        if marked:
            try:
                self.provider.delete(marked)
            except NotFound:
                pass
            except MigctlError as exc:
                self._provider_failed("delete", exc)
            self.dispatch.provision()
        return marked

    def _expire_command(self, vm_id: str, now: float) -> None:
        for _ in range(5):
            got = self.store.get_vm(vm_id)
            if got is None or not got[0].cmd_id:
                return
            vm, rev = got
            revs = {f"vm:{vm_id}": rev}
            reserved = None
            if vm.reserved_job and (got_job := self.store.get_job(vm.reserved_job)):
                reserved, revs[f"job:{vm.reserved_job}"] = got_job
            change = t.command_acked(
                vm,
                reserved,
                command_id=vm.cmd_id,
                success=False,
                message="no ack within the command's life",
                now=now,
                max_retries=self.settings.scheduler.max_retries,
            )
            try:
                self.store.save(change, revs, counters={"commands_expired": 1})
            except Conflict:
                continue
            for job_id in change.requeued:
                self.dispatch.assign_job(job_id)
            return

    def _expire_lost(self, job_id: str, now: float) -> bool:
        for _ in range(5):
            got = self.store.get_job(job_id)
            if got is None:
                return False
            job, rev = got
            change = t.lost_job_expired(job, now=now, after=LOST_JOB_S)
            if change.empty:
                return False
            try:
                self.store.save(change, {f"job:{job_id}": rev}, counters={"failed_jobs": 1})
            except Conflict:
                continue
            log.warning("job %s: %s", job_id, change.jobs[job_id].reason)
            return True
        return False

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
        """Scale down VMs idle past idle_timeout above the warm pool: drain registered
        runners first, then stop (or suspend/delete) by the pool's idle_action."""
        report = Report()
        vmm = self.settings.vm_manager
        now = self.clock.now()
        with self.store.try_lock("idle", timeout=120) as got:
            if not got:
                return report
            plan = idle_plan(
                [vm for vm, _ in self.store.get_vms()],
                now,
                min_ready=vmm.min_ready_vms,
                idle_timeout=vmm.idle_timeout,
                drain_timeout=vmm.drain_timeout,
                queue_length=self.store.queue_length(),
            )
            report.add(
                "undrain",
                self._mark(plan.undrain, lambda vm: vm.with_(lifecycle=Lifecycle.NONE, cmd_id="")),
            )
            report.add("drain", self.drain(plan.drain, now))
            report.add(self.settings.pool.idle_action, self._scale_down(plan.stop, now))
        return report

    def drain(self, ids: Sequence[str], now: float, reason: str = "idle") -> list[str]:
        """Send `drain`: the agent removes its idle runner and acks; the next pass stops it."""
        done = []
        for vm, rev in self.store.get_vms(ids):
            if not is_free(vm):
                continue
            command = {
                "id": uuid.uuid4().hex,
                "type": "drain",
                "string_params": {
                    "reason": reason,
                    "timeout": str(int(self.settings.vm_manager.drain_timeout)),
                },
                "int_params": {"timeout": int(self.settings.vm_manager.drain_timeout)},
                "created_at": int(now),
                "expires_at": now + self.settings.vm_manager.drain_timeout,
            }
            new = vm.with_(
                lifecycle=Lifecycle.DRAINING, state_since=now, cmd_id=command["id"], cmd_sent_at=now
            )
            try:
                self.store.save(
                    t.Change(vms={vm.id: new}),
                    {f"vm:{vm.id}": rev},
                    commands=[(vm.id, command, 3600)],
                )
            except Conflict:
                continue  # it just took a job: leave it
            done.append(vm.id)
        return done

    def _scale_down(self, ids: Sequence[str], now: float) -> list[str]:
        action = self.settings.pool.idle_action
        lifecycle = {
            "stop": Lifecycle.STOPPING,
            "suspend": Lifecycle.SUSPENDING,
            "delete": Lifecycle.DELETING,
        }[action]

        def still_idle(vm: Vm) -> Vm:
            # Re-checked on the fresh record: a VM that took a job meanwhile is left alone.
            if vm.job_id or vm.reserved_job or vm.agent is AgentState.JOB_RUNNING:
                return vm
            if vm.lifecycle not in (Lifecycle.NONE, Lifecycle.DRAINING):
                return vm
            return vm.with_(lifecycle=lifecycle, state_since=now, cmd_id="")

        marked = [vm_id for vm_id in self._mark(ids, still_idle, changed_only=True)]
        if not marked:
            return []
        try:
            getattr(self.provider, action)(marked)
        except NotFound:
            pass
        except MigctlError as exc:
            self._mark(marked, lambda vm: vm.with_(lifecycle=Lifecycle.NONE))
            self._provider_failed(action, exc)
            return []
        self.store.incr(f"idle_{action}_vms", len(marked))
        return marked

    def _mark(
        self, ids: Sequence[str], update: Callable[[Vm], Vm], changed_only: bool = False
    ) -> list[str]:
        """Apply `update` to each VM with a compare, in one round trip; returns those
        written (a VM claimed meanwhile is skipped, so a stop never lands on a VM that
        just got a job)."""
        items, written = [], []
        for vm, rev in self.store.get_vms(ids):
            new = update(vm)
            if changed_only and new == vm:
                continue
            items.append((t.Change(vms={vm.id: new}), {f"vm:{vm.id}": rev}))
            written.append(vm.id)
        return [vm_id for vm_id, ok in zip(written, self.store.save_many(items), strict=True) if ok]


def _observe(vm: Vm, status: InfraStatus, now: float) -> Vm:
    """Fold the provider's status into the record; a finished lifecycle step is cleared."""
    settled_down = status in (InfraStatus.STOPPED, InfraStatus.SUSPENDED) and not vm.connected
    if status == vm.infra and vm.lifecycle is Lifecycle.NONE and not settled_down:
        return vm  # the steady state of almost every VM on every pass: no copy
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
