"""The controller, replayed without Redis: what the worker does on each event, decided by
the domain's own functions (scheduler.decide/provision/candidates, transitions,
states.effective_state via `Vm.state` and `is_free`).

Step for step it mirrors services/assignment.py (assign_job, assign_vm, claim, then
register_runner), services/events.py (job_started/job_completed/command_acked and agent
states, then dispatch of requeued jobs and freed VMs) and services/pool.py (provision
pass, idle stop, the sweep's queue kick), on beat's schedule. Tasks run in order at the
same virtual instant, as a Celery queue with no latency. One addition: a free VM whose
runner is still registered is drained (runner removed) before the idle action, as
issue 8's safe scale-down describes. Left out, as nothing fails in the simulated world:
the GCloud sync (the world is the truth), health sweeps and assignment timeouts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Sequence
from typing import Protocol

from migctl.domain import transitions as t
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.scheduler import (
    Assign,
    Defer,
    ScaleUp,
    StartStopped,
    candidates,
    decide,
    provision,
)
from migctl.domain.states import check_move, is_free
from migctl.simulate.policy import Policy
from migctl.simulate.trace import TraceJob

MAX_RETRIES = 3  # scheduler.max_retries default; no failure is simulated, so never spent
SCALE_WINDOW_S = 60.0  # max_scale_up_per_minute counts VMs scaled in the last minute
QUEUED_SCAN = 50  # assign_vm reads the first 50 queued jobs (services/assignment.py)

_GOING_DOWN = {
    "stop": Lifecycle.STOPPING,
    "suspend": Lifecycle.SUSPENDING,
    "delete": Lifecycle.DELETING,
}


class World(Protocol):
    """What the controller asks of the cloud, GitHub and the agents. Every call returns at
    once (the VmProvider and command-outbox contract); results come back as events."""

    def vm_action(self, action: str, ids: Sequence[str], now: float) -> None:
        """create / start / resume / stop / suspend / delete, one batched MIG call."""

    def register(self, vm_id: str, command_id: str, now: float) -> None:
        """Deliver register_runner to the VM's agent."""

    def drain(self, vm_id: str, now: float) -> None:
        """Ask the agent to remove its idle runner from GitHub."""


class Controller:
    def __init__(self, policy: Policy, world: World, labels: tuple[str, ...]) -> None:
        self.policy = policy
        self.limits = policy.limits
        self.world = world
        self.labels = labels
        self.jobs: dict[str, Job] = {}
        self.vms: dict[str, Vm] = {}
        self.calls: Counter[str] = Counter()  # API calls by kind
        self.vm_actions: Counter[str] = Counter()  # VMs acted on by kind
        self.decisions: Counter[str] = Counter()
        self.events: Counter[str] = Counter()  # notable domain outcomes (reservation swaps)
        self.epoch = 0  # bumped on every write: a periodic pass on an unchanged pool is skipped
        self._queue: list[tuple[float, int, str]] = []  # QUEUED jobs in queue order
        self._order: dict[str, tuple[float, int, str]] = {}
        self._scaled: deque[float] = deque()
        self._tasks: deque[tuple[str, str]] = deque()
        self._provision_queued = False
        self._passes: dict[str, tuple[int, float]] = {}
        self._free: dict[str, bool] = {}  # is_free per VM, kept on write (a hot path)
        self._vm_seq = 0
        self._cmd_seq = 0

    # -- the store, reduced to dicts ---------------------------------------------------------

    def _put_job(self, job: Job) -> None:
        old = self.jobs.get(job.id)
        if old is not None and old.state is not job.state:
            check_move(old.state, job.state)  # a simulator bug if the tables forbid it
        self.jobs[job.id] = job
        key = self._order[job.id]
        i = bisect_left(self._queue, key)
        present = i < len(self._queue) and self._queue[i] == key
        if job.state is JobState.QUEUED and not present:
            self._queue.insert(i, key)
        elif job.state is not JobState.QUEUED and present:
            del self._queue[i]
        self.epoch += 1

    def _put_vm(self, vm: Vm) -> None:
        self.vms[vm.id] = vm
        self._free[vm.id] = is_free(vm)
        self.epoch += 1

    def _free_vms(self) -> list[Vm]:
        return [self.vms[vm_id] for vm_id, free in self._free.items() if free]

    def _apply(self, change: t.Change) -> None:
        """events._write: write the change, then dispatch requeued jobs and free VMs."""
        for job in change.jobs.values():
            self._put_job(job)
        for vm in change.vms.values():
            self._put_vm(vm)
        for job_id in change.requeued:
            self._dispatch("assign_job", job_id)
        freed = set(change.freed) | {vm.id for vm in change.vms.values() if is_free(vm)}
        for vm_id in sorted(freed):
            self._dispatch("assign_vm", vm_id)

    def _update_vm(self, new: Vm) -> None:
        if new != self.vms[new.id]:
            self._apply(t.Change(vms={new.id: new}))

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def inflight(self) -> int:
        return sum(1 for vm in self.vms.values() if vm.cmd_id)

    def scaled_recently(self, now: float) -> int:
        while self._scaled and self._scaled[0] <= now - SCALE_WINDOW_S:
            self._scaled.popleft()
        return len(self._scaled)

    # -- tasks ----------------------------------------------------------------------------------

    def _dispatch(self, task: str, arg: str = "") -> None:
        if task == "provision":
            if self._provision_queued:
                return  # the pending pass will see this demand too
            self._provision_queued = True
        self._tasks.append((task, arg))

    def run_tasks(self, now: float) -> None:
        while self._tasks:
            task, arg = self._tasks.popleft()
            if task == "assign_job":
                self._assign_job(arg, now)
            elif task == "assign_vm":
                self._assign_vm(arg, now)
            else:
                self._provision_queued = False
                self._provision(now)

    # -- events from the world ---------------------------------------------------------------

    def job_arrived(self, job: TraceJob, now: float) -> None:
        self._order[job.id] = (now, len(self._order), job.id)
        self._put_job(Job(id=job.id, labels=job.labels, received_at=now, updated_at=now))
        self._dispatch("assign_job", job.id)

    def vm_ready(self, vm_id: str, now: float) -> None:
        vm = self.vms[vm_id].with_(infra=InfraStatus.RUNNING, state_since=now)
        self._update_vm(t.agent_reported(vm, AgentState.READY, now=now))

    def registering(self, vm_id: str, now: float) -> None:
        self._update_vm(t.agent_reported(self.vms[vm_id], AgentState.REGISTERING, now=now))

    def runner_registered(self, vm_id: str, command_id: str, now: float) -> None:
        self._update_vm(t.agent_reported(self.vms[vm_id], AgentState.IDLE, now=now))
        vm = self.vms[vm_id]
        reserved = self.jobs.get(vm.reserved_job) if vm.reserved_job else None
        self._apply(
            t.command_acked(
                vm,
                reserved,
                command_id=command_id,
                success=True,
                message="",
                now=now,
                max_retries=MAX_RETRIES,
            )
        )

    def _involved(self, vm: Vm, job: Job) -> tuple[Job | None, Vm | None]:
        """events._apply: the job `vm` was reserved for, and the VM `job` was reserved on."""
        reserved = None
        if vm.reserved_job and vm.reserved_job != job.id:
            reserved = self.jobs.get(vm.reserved_job)
        other = None
        if job.state is JobState.ASSIGNED and job.vm_id and job.vm_id != vm.id:
            other = self.vms.get(job.vm_id)
        return reserved, other

    def job_started(self, vm_id: str, job_id: str, now: float) -> None:
        vm, job = self.vms[vm_id], self.jobs[job_id]
        reserved, other = self._involved(vm, job)
        if job.state is JobState.QUEUED:
            self.events["started before any claim"] += 1
        elif other is not None:
            self.events["started on another job's VM (swap)"] += 1
        if reserved is not None and other is None:
            self.events["reservation sent back to the queue"] += 1
        self._apply(t.job_started(vm, job, reserved=reserved, other_vm=other, run_id="", now=now))
        self._update_vm(t.agent_reported(self.vms[vm_id], AgentState.JOB_RUNNING, now=now))

    def job_completed(self, vm_id: str, job_id: str, now: float) -> None:
        vm, job = self.vms[vm_id], self.jobs[job_id]
        reserved, other = self._involved(vm, job)
        self._apply(
            t.job_completed(
                vm, job, success=True, reserved=reserved, other_vm=other, run_id="", now=now
            )
        )
        # Ephemeral runner: the agent is READY again; post_job=reuse gives it the next job.
        self._update_vm(t.agent_reported(self.vms[vm_id], AgentState.READY, now=now))

    def vm_down(self, vm_id: str, action: str, now: float) -> None:
        """pool._observe: the MIG lists the VM stopped/suspended/gone; the agent is gone."""
        if action == "delete":
            del self.vms[vm_id]
            del self._free[vm_id]
            self.epoch += 1
            return
        infra = InfraStatus.SUSPENDED if action == "suspend" else InfraStatus.STOPPED
        self._put_vm(
            self.vms[vm_id].with_(
                infra=infra,
                state_since=now,
                lifecycle=Lifecycle.NONE,
                connected=False,
                agent=AgentState.NONE,
                runner_registered=False,
                unhealthy=False,
            )
        )

    def drained(self, vm_id: str, now: float) -> None:
        """The agent removed its runner: the idle action goes ahead, unless GitHub handed
        the runner a job meanwhile (the VM keeps its job)."""
        vm = self.vms[vm_id]
        if vm.job_id:
            self._put_vm(vm.with_(lifecycle=Lifecycle.NONE))
            self.events["drain cancelled by a job"] += 1
            return
        action = self.policy.idle_action
        self._put_vm(
            vm.with_(
                runner_registered=False,
                agent=AgentState.READY,
                lifecycle=_GOING_DOWN[action],
                state_since=now,
            )
        )
        self._act(action, [vm_id], now)

    # -- assignment (services/assignment.py) ------------------------------------------------

    def _assign_job(self, job_id: str, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return
        vms = list(self.vms.values())
        decision = decide(
            job,
            vms,
            demand=len(self._queue),
            limits=self.limits,
            assignments_in_flight=self.inflight(),
            scaled_last_minute=self.scaled_recently(now),
        )
        self.decisions[f"assign_job:{type(decision).__name__}"] += 1
        # decide() applies max_concurrent_assignments before the claim; claim.lua applies
        # it only to VMs that need a registration. Both hold registrations in flight to it.
        if isinstance(decision, Assign):
            self._claim(job, self.vms[decision.vm_ids[0]], now)
        elif not (isinstance(decision, Defer) and candidates(job, vms)):
            # No free VM: ask for a provisioning pass (the limit case just waits).
            self._dispatch("provision")

    def _assign_vm(self, vm_id: str, now: float) -> None:
        vm = self.vms.get(vm_id)
        if vm is None or not is_free(vm):
            return
        for _, _, job_id in self._queue[:QUEUED_SCAN]:
            job = self.jobs[job_id]
            if not candidates(job, [vm]):
                continue
            if (
                not vm.runner_registered
                and self.inflight() >= self.limits.max_concurrent_assignments
            ):
                return
            self._claim(job, vm, now)
            return

    def _claim(self, job: Job, vm: Vm, now: float) -> None:
        """claim.lua, then _after_claim/_register: reserve, and send register_runner unless
        the VM's runner is already registered (GitHub then hands it a job by itself)."""
        self._put_vm(vm.with_(reserved_job=job.id, reserved_at=now))
        self._put_job(
            job.with_(
                state=JobState.ASSIGNED, vm_id=vm.id, assigned_at=now, updated_at=now, reason=""
            )
        )
        if vm.runner_registered:
            return
        self._cmd_seq += 1
        command_id = f"cmd-{self._cmd_seq}"
        self._put_vm(self.vms[vm.id].with_(cmd_id=command_id))
        self.calls["github.registration_token"] += 1
        self.world.register(vm.id, command_id, now)

    # -- pool (services/pool.py) ---------------------------------------------------------------

    def _provision(self, now: float) -> None:
        demand = len(self._queue) + self.policy.min_ready(now)
        decision = provision(
            demand, list(self.vms.values()), self.limits, self.scaled_recently(now)
        )
        self.decisions[f"provision:{type(decision).__name__}"] += 1
        if isinstance(decision, Defer):
            return
        if isinstance(decision, StartStopped):
            self._wake("resume", decision.resume, now)
            self._wake("start", decision.start, now)
            create = decision.then_create
        else:
            assert isinstance(decision, ScaleUp)
            create = decision.count
        if create:
            ids = []
            for _ in range(create):
                self._vm_seq += 1
                ids.append(f"vm-{self._vm_seq:04d}")
            for vm_id in ids:
                self._put_vm(
                    Vm(
                        id=vm_id,
                        labels=self.labels,
                        infra=InfraStatus.CREATING,
                        lifecycle=Lifecycle.STARTING,
                        created_at=now,
                        state_since=now,
                    )
                )
            self._scaled.extend([now] * len(ids))
            self._act("create", ids, now)

    def _wake(self, action: str, ids: Sequence[str], now: float) -> None:
        if not ids:
            return
        for vm_id in ids:
            self._put_vm(
                self.vms[vm_id].with_(
                    lifecycle=Lifecycle.STARTING, infra=InfraStatus.STARTING, state_since=now
                )
            )
        self._scaled.extend([now] * len(ids))
        self._act(action, ids, now)

    def _act(self, action: str, ids: Sequence[str], now: float) -> None:
        self.calls[f"gce.{action}"] += 1
        self.vm_actions[action] += len(ids)
        self.world.vm_action(action, ids, now)

    def _idle_stop(self, now: float) -> None:
        free = sorted(self._free_vms(), key=lambda vm: (-vm.last_active, vm.id))
        if self._queue:
            return
        surplus = [
            vm
            for vm in free[self.policy.min_ready(now) :]
            if now - vm.last_active > self.policy.idle_timeout
        ]
        action = self.policy.idle_action
        plain = [vm.id for vm in surplus if not vm.runner_registered]
        for vm_id in plain:
            self._put_vm(self.vms[vm_id].with_(lifecycle=_GOING_DOWN[action], state_since=now))
        if plain:
            self._act(action, plain, now)
        for vm in surplus:
            if vm.runner_registered:
                self._put_vm(vm.with_(lifecycle=Lifecycle.DRAINING, state_since=now))
                self.calls["github.remove_runner"] += 1
                self.world.drain(vm.id, now)

    def _sweep(self, now: float) -> None:
        """pool.sweep's queue kick: the first queued jobs (one per free VM) are retried."""
        if not self._queue:
            return
        free = len(self._free_vms())
        for _, _, job_id in self._queue[: max(free, 1)]:
            self._dispatch("assign_job", job_id)
        self._dispatch("provision")

    def periodic(self, name: str, now: float) -> None:
        """A beat pass: `sweep`, or `reconcile` (idle stop, then provision). Skipped when no
        record changed since a pass that did nothing and no deadline it depends on passed:
        the result would be the same, and a day has 8640 reconcile ticks."""
        seen, wake = self._passes.get(name, (-1, 0.0))
        if seen == self.epoch and now < wake:
            return
        before = self.epoch
        if name == "sweep":
            self._sweep(now)
        else:
            self._idle_stop(now)
            self._provision(now)
        self.run_tasks(now)
        self._passes[name] = (before, self._wake_at(now)) if self.epoch == before else (-1, 0.0)

    def _wake_at(self, now: float) -> float:
        """The first time a pass over this same pool could decide differently."""
        times = [self.policy.next_warm_change(now)]
        if self._scaled:
            times.append(self._scaled[0] + SCALE_WINDOW_S)
        times.extend(
            vm.last_active + self.policy.idle_timeout
            for vm in self._free_vms()
            if vm.last_active + self.policy.idle_timeout >= now
        )
        return min(times)
