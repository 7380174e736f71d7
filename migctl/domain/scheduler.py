"""The scheduling decision: given a job, the pool and the limits, what to do now.

Returns a value (`Assign`, `StartStopped`, `ScaleUp`, `Defer`); the assignment service
applies it. Nothing here waits: a VM on its way is counted as future capacity and the
agent's `ready` event finishes the job's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from migctl.domain.model import Job, JobState, Vm, VmState, covers
from migctl.domain.states import ON_THE_WAY, is_free


@dataclass(frozen=True)
class Limits:
    max_vms: int = 50
    max_scale_up_per_minute: int = 5
    max_concurrent_assignments: int = 10


@dataclass(frozen=True)
class Assign:
    """Claim the first of these VMs that is still free (the store's compare decides)."""

    vm_ids: tuple[str, ...]


@dataclass(frozen=True)
class StartStopped:
    """Resume suspended and start stopped VMs; then create `then_create` more if still short."""

    start: tuple[str, ...] = ()
    resume: tuple[str, ...] = ()
    then_create: int = 0


@dataclass(frozen=True)
class ScaleUp:
    count: int


@dataclass(frozen=True)
class Defer:
    reason: str


Decision = Assign | StartStopped | ScaleUp | Defer


def candidates(job: Job, vms: Sequence[Vm]) -> list[Vm]:
    """Free VMs whose labels cover the job's, most recently active first (the PRD's order)."""
    free = [vm for vm in vms if is_free(vm) and covers(vm.labels, job.labels)]
    return sorted(free, key=lambda vm: (-vm.last_active, vm.id))


def _counts_toward_max(vm: Vm) -> bool:
    return vm.state is not VmState.DELETING


def provision(
    demand: int, vms: Sequence[Vm], limits: Limits, scaled_last_minute: int
) -> StartStopped | ScaleUp | Defer:
    """Capacity for `demand` queued jobs with no free VM: count what is on its way first.

    `demand` counts queued jobs that hold no VM. Capacity already on the way (booting VMs
    that hold no demand, free VMs) is subtracted, so repeated decisions for the same
    demand never provision twice.
    """
    coming = sum(
        1
        for vm in vms
        if not vm.reserved_job and not vm.job_id and (vm.state in ON_THE_WAY or is_free(vm))
    )
    need = demand - coming
    if need <= 0:
        return Defer(f"waiting for {coming} VM(s) already on the way")
    budget = limits.max_scale_up_per_minute - scaled_last_minute
    if budget <= 0:
        return Defer("max_scale_up_per_minute reached; retrying next minute")
    need = min(need, budget)
    by_recency = sorted(vms, key=lambda vm: (-vm.last_active, vm.id))
    suspended = [vm.id for vm in by_recency if vm.state is VmState.SUSPENDED]
    stopped = [vm.id for vm in by_recency if vm.state is VmState.STOPPED]
    resume = tuple(suspended[:need])
    start = tuple(stopped[: need - len(resume)])
    short = need - len(resume) - len(start)
    room = limits.max_vms - sum(1 for vm in vms if _counts_toward_max(vm))
    create = max(0, min(short, room))
    if resume or start:
        return StartStopped(start=start, resume=resume, then_create=create)
    if create:
        return ScaleUp(create)
    return Defer(f"max_vms ({limits.max_vms}) reached")


def decide(
    job: Job,
    vms: Sequence[Vm],
    *,
    demand: int,
    limits: Limits,
    assignments_in_flight: int = 0,
    scaled_last_minute: int = 0,
) -> Decision:
    """What to do for one queued job. `demand`: queued jobs holding no VM, this one included."""
    if job.state is not JobState.QUEUED:
        return Defer(f"job is {job.state}, not QUEUED")
    found = candidates(job, vms)
    if found:
        if assignments_in_flight >= limits.max_concurrent_assignments:
            return Defer("max_concurrent_assignments reached")
        return Assign(tuple(vm.id for vm in found))
    return provision(max(demand, 1), vms, limits, scaled_last_minute)


def oldest_match(vm: Vm, queued: Sequence[Job]) -> Job | None:
    """The job a newly free VM should take: queue order (priority, then arrival) that it covers."""
    for job in queued:
        if job.state is JobState.QUEUED and covers(vm.labels, job.labels):
            return job
    return None
