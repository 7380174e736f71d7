"""What each event does to jobs and VMs, as pure functions returning the changed records.

The store writes a `Change` atomically, with a compare on every record's revision, and
the caller retries on a conflict with fresh reads. GitHub hands a job to ANY matching
runner, so a job binds to a VM on `job_started`; the reservation that VM held moves to
the VM the started job had reserved (a swap), or goes back to the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from migctl.domain.model import AgentState, Job, JobState, Lifecycle, Vm


@dataclass
class Change:
    """Records to write together, and what to do after the write."""

    jobs: dict[str, Job] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    requeued: list[str] = field(default_factory=list)  # job ids that need a runner again
    freed: list[str] = field(default_factory=list)  # vm ids that may take the next job
    notes: list[str] = field(default_factory=list)

    def job(self, job: Job) -> Job:
        self.jobs[job.id] = job
        return job

    def vm(self, vm: Vm) -> Vm:
        self.vms[vm.id] = vm
        return vm

    @property
    def empty(self) -> bool:
        return not self.jobs and not self.vms


def requeue(job: Job, now: float, reason: str, max_retries: int, *, count: bool = True) -> Job:
    """Back to the queue, or FAILED once the retries are spent. `count=False` for a
    reservation that moved through no fault of the job (its runner took another job)."""
    retries = job.retries + (1 if count else 0)
    if count and retries > max_retries:
        return job.with_(
            state=JobState.FAILED,
            vm_id="",
            retries=retries,
            reason=f"{reason}; gave up after {max_retries} retries",
            updated_at=now,
            finished_at=now,
        )
    return job.with_(
        state=JobState.QUEUED, vm_id="", retries=retries, reason=reason, updated_at=now, lost_at=0.0
    )


def _release_reservation(
    change: Change,
    vm: Vm,
    started: Job,
    reserved: Job | None,
    other_vm: Vm | None,
    now: float,
) -> None:
    """`vm`'s runner was taken by `started`, not by the job it was reserved for.

    The job it was reserved for takes over `other_vm`'s reservation when there is one
    (`started` had reserved it), else goes back to the queue at its old place.
    """
    if other_vm is not None and other_vm.reserved_job != started.id:
        other_vm = None  # that VM has moved on to other demand: leave it alone
    if reserved is None or reserved.state is not JobState.ASSIGNED or reserved.vm_id != vm.id:
        if other_vm is not None:
            change.vm(other_vm.with_(reserved_job="", reserved_at=0.0))
            change.freed.append(other_vm.id)
        return
    if other_vm is not None:
        change.vm(other_vm.with_(reserved_job=reserved.id, reserved_at=now))
        change.job(reserved.with_(vm_id=other_vm.id, updated_at=now))
        change.notes.append(f"job {reserved.id} now waits for the runner on {other_vm.id}")
    else:
        change.job(requeue(reserved, now, f"runner on {vm.id} took another job", 0, count=False))
        change.requeued.append(reserved.id)


def job_started(
    vm: Vm,
    job: Job,
    *,
    reserved: Job | None,
    other_vm: Vm | None,
    run_id: str,
    now: float,
) -> Change:
    """The agent on `vm` reports that GitHub handed its runner `job`.

    `reserved`: the job `vm` was reserved for, if not `job`. `other_vm`: the VM `job`
    was reserved on, if not `vm`.
    """
    change = Change()
    if job.state.terminal:
        # We hold it as ended (its webhook came first, or we gave up on it) yet GitHub
        # handed it to this runner: the binding is moot, but the ephemeral runner is
        # consumed all the same, so the demand it was reserved for must find another.
        change.notes.append(f"job {job.id} already {job.state}; start ignored")
        if job.vm_id == vm.id and vm.reserved_job != job.id:
            return change  # a late duplicate of a start this VM already settled
        if vm.reserved_job:
            change.vm(vm.with_(reserved_job="", reserved_at=0.0, last_active=now))
            if reserved is not None and reserved.id != job.id:
                _release_reservation(change, vm, job, reserved, None, now)
        return change
    if job.state is JobState.RUNNING:
        if job.vm_id != vm.id:
            change.notes.append(
                f"job {job.id} already running on {job.vm_id}; start from {vm.id} ignored"
            )
        return change
    change.job(
        job.with_(
            state=JobState.RUNNING,
            lost_at=0.0,
            vm_id=vm.id,
            run_id=job.run_id or run_id,
            started_at=now,
            updated_at=now,
            reason="",
        )
    )
    change.vm(
        vm.with_(
            job_id=job.id, reserved_job="", reserved_at=0.0, last_active=now, runner_registered=True
        )
    )
    _release_reservation(change, vm, job, reserved, other_vm, now)
    return change


def job_completed(
    vm: Vm,
    job: Job,
    *,
    success: bool,
    reserved: Job | None,
    other_vm: Vm | None,
    run_id: str,
    now: float,
) -> Change:
    """The agent on `vm` reports `job` done. Also right when `job_started` never came,
    or comes later (it is then ignored, the job being terminal)."""
    change = Change()
    if not job.state.terminal:
        if job.state is not JobState.RUNNING or job.vm_id != vm.id:
            change = job_started(
                vm, job, reserved=reserved, other_vm=other_vm, run_id=run_id, now=now
            )
        job = change.jobs.get(job.id, job)
        vm = change.vms.get(vm.id, vm)
        change.job(
            job.with_(
                state=JobState.COMPLETED,
                vm_id=vm.id,
                conclusion="success" if success else "failure",
                finished_at=now,
                updated_at=now,
            )
        )
    if vm.job_id in ("", job.id):
        # Ephemeral runners: one job per registration, so the VM needs a new one.
        reserved_job = "" if vm.reserved_job == job.id else vm.reserved_job
        change.vm(
            vm.with_(job_id="", reserved_job=reserved_job, runner_registered=False, last_active=now)
        )
    return change


def runner_crashed(
    vm: Vm, running: Job | None, reserved: Job | None, *, now: float, max_retries: int, reason: str
) -> Change:
    """The runner process died: its job (started or not) is retried, bounded."""
    change = Change()
    for job in (running, reserved):
        if job is not None and not job.state.terminal and job.vm_id == vm.id:
            new = change.job(requeue(job, now, f"runner on {vm.id} crashed: {reason}", max_retries))
            if new.state is JobState.QUEUED:
                change.requeued.append(new.id)
    change.vm(
        vm.with_(job_id="", reserved_job="", cmd_id="", runner_registered=False, last_active=now)
    )
    return change


def command_acked(
    vm: Vm,
    reserved: Job | None,
    *,
    command_id: str,
    success: bool,
    message: str,
    now: float,
    max_retries: int,
) -> Change:
    """The agent answered a `register_runner`. A refusal sends the job back, bounded."""
    change = Change()
    if vm.cmd_id != command_id:
        change.notes.append(f"ack of {command_id} on {vm.id} is stale")
        return change
    if success:
        change.vm(vm.with_(cmd_id=""))
        return change
    if vm.lifecycle is Lifecycle.DRAINING:
        # The agent would not drain now (e.g. mid-registration): the next pass asks again.
        change.vm(vm.with_(cmd_id="", lifecycle=Lifecycle.NONE))
        return change
    change.vm(vm.with_(cmd_id="", reserved_job="", reserved_at=0.0, runner_registered=False))
    if reserved is not None and reserved.state is JobState.ASSIGNED and reserved.vm_id == vm.id:
        new = change.job(
            requeue(reserved, now, f"registration on {vm.id} failed: {message}", max_retries)
        )
        if new.state is JobState.QUEUED:
            change.requeued.append(new.id)
    return change


def job_ended_elsewhere(
    job: Job, vm: Vm | None, *, state: JobState, reason: str, conclusion: str, now: float
) -> Change:
    """GitHub says the job finished, was cancelled, or went to a runner not ours: the
    demand it held is released and a VM reserved for it goes back to the pool."""
    change = Change()
    if job.state.terminal:
        return change
    change.job(
        job.with_(
            state=state,
            reason=reason,
            conclusion=conclusion or job.conclusion,
            finished_at=now,
            updated_at=now,
        )
    )
    if vm is not None:
        if vm.reserved_job == job.id:
            change.vm(vm.with_(reserved_job="", reserved_at=0.0))
            change.freed.append(vm.id)
        elif vm.job_id == job.id:
            change.vm(vm.with_(job_id="", last_active=now))
    return change


def assignment_timed_out(job: Job, vm: Vm | None, *, now: float, max_retries: int) -> Change:
    """An ASSIGNED job whose runner never started it goes back to the queue (counted)."""
    change = Change()
    if job.state is not JobState.ASSIGNED:
        return change
    new = change.job(
        requeue(job, now, f"no runner started it on {job.vm_id or 'its VM'} in time", max_retries)
    )
    if new.state is JobState.QUEUED:
        change.requeued.append(job.id)
    if vm is not None and vm.reserved_job == job.id:
        change.vm(vm.with_(reserved_job="", reserved_at=0.0))
        change.freed.append(vm.id)
    return change


def lost_job_expired(job: Job, *, now: float, after: float) -> Change:
    """A job whose VM was lost while running it, with no word from GitHub since: its
    `completed` was lost too. It cannot run again (GitHub will not hand it out twice), so
    it ends FAILED rather than holding demand forever."""
    change = Change()
    if job.state is not JobState.RUNNING or not job.lost_at:
        return change
    reason = (
        f"its VM {job.vm_id} was lost while running it and GitHub never reported its end "
        f"within {after:.0f}s"
    )
    change.job(job.with_(state=JobState.FAILED, reason=reason, updated_at=now, finished_at=now))
    return change


def vm_lost(
    vm: Vm, running: Job | None, reserved: Job | None, *, now: float, max_retries: int
) -> Change:
    """The VM is gone or replaced. A job GitHub had handed its runner stays RUNNING there,
    marked lost: GitHub fails it once it notices the runner is gone, and will never hand
    it to another runner, so queueing it again would only boot a VM for nothing (the
    sweep ends it if GitHub never says, `lost_job_expired`). A job only reserved on it
    goes back to the queue (bounded)."""
    change = Change()
    for job in (running, reserved):
        if job is None or job.state.terminal or job.vm_id != vm.id:
            continue
        if job.state is JobState.RUNNING:
            reason = f"VM {vm.id} was lost while running it; GitHub settles it"
            change.job(job.with_(lost_at=now, reason=reason, updated_at=now))
            continue
        new = change.job(requeue(job, now, f"VM {vm.id} was lost", max_retries))
        if new.state is JobState.QUEUED:
            change.requeued.append(new.id)
    change.vm(
        vm.with_(job_id="", reserved_job="", cmd_id="", runner_registered=False, connected=False)
    )
    return change


_AGENT_REGISTERED = {AgentState.IDLE, AgentState.JOB_RUNNING}


def agent_reported(
    vm: Vm, state: AgentState, *, now: float, capabilities: tuple[str, ...] | None = None
) -> Vm:
    """A heartbeat whose `miglet_state` differs from what we had, or a (re)connect."""
    changes: dict[str, object] = {"agent": state, "connected": True}
    if state is AgentState.READY and vm.job_id:
        # The agent waits for a registration, so its runner (and the job on it) is gone:
        # we missed the job's end (lost with an outage); GitHub's own completion settles
        # the job, the VM must not stay BUSY meanwhile.
        changes["job_id"] = ""
    if vm.lifecycle is Lifecycle.STARTING:
        changes["lifecycle"] = Lifecycle.NONE
    if state in _AGENT_REGISTERED:
        changes["runner_registered"] = True
    elif state is AgentState.READY:
        changes["runner_registered"] = False
    if state in (AgentState.READY, AgentState.IDLE) and vm.agent not in (
        AgentState.READY,
        AgentState.IDLE,
    ):
        changes["last_active"] = now
    if capabilities is not None:
        changes["capabilities"] = capabilities
    return vm.with_(**changes)


def parse_bool(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def event_job(data: Mapping[str, str]) -> tuple[str, str]:
    """(job_id, run_id) from an event's data map."""
    return data.get("job_id", "").strip(), data.get("run_id", "").strip()
