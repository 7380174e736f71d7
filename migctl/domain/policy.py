"""Pool policy as plans: given the pool's VMs and `now`, which VMs to mark, drain, stop
or replace. Pure; the pool reconcilers apply a plan with a compare on each VM.

Safety rule of every plan: a VM holding a job (running or reserved) is never stopped;
an idle VM whose runner is registered in GitHub is drained first, so no runner is left
behind offline and no job GitHub is about to hand it is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from migctl.domain.model import AgentState, InfraStatus, Lifecycle, Vm
from migctl.domain.states import ON_THE_WAY, is_free


@dataclass(frozen=True)
class HealthPlan:
    unhealthy: tuple[str, ...] = ()
    healthy: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)


def _silent_for(vm: Vm, now: float) -> float:
    """Seconds since the agent was last heard, for a VM that should be heard (0 if not)."""
    expected = vm.connected or vm.infra is InfraStatus.RUNNING
    if not expected or not vm.last_heartbeat or vm.lifecycle is not Lifecycle.NONE:
        return 0.0
    return now - vm.last_heartbeat


def health_plan(
    vms: Sequence[Vm], now: float, *, heartbeat_timeout: float, boot_timeout: float
) -> HealthPlan:
    """Silent agents become UNHEALTHY; an unhealthy VM with no job is replaced at once,
    one with a job after a grace period of another heartbeat_timeout (a job running on
    it is then left to GitHub's verdict, a reserved one requeued; see `vm_lost`). A VM
    stuck on its way up past boot_timeout is replaced."""
    unhealthy: list[str] = []
    healthy: list[str] = []
    replace: list[str] = []
    reasons: dict[str, str] = {}
    for vm in vms:
        silent = _silent_for(vm, now)
        if silent > heartbeat_timeout:
            if not vm.unhealthy:
                unhealthy.append(vm.id)
                reasons[vm.id] = f"no heartbeat for {silent:.0f}s"
            holds_job = bool(vm.job_id or vm.reserved_job)
            if vm.unhealthy and (not holds_job or silent > 2 * heartbeat_timeout):
                replace.append(vm.id)
                reasons[vm.id] = f"unhealthy, silent for {silent:.0f}s" + (
                    " (it holds a job)" if holds_job else ""
                )
        elif vm.unhealthy and vm.connected and silent <= heartbeat_timeout:
            healthy.append(vm.id)
        elif (
            not vm.connected
            and vm.state in ON_THE_WAY
            and vm.lifecycle in (Lifecycle.NONE, Lifecycle.STARTING)
            and vm.state_since
            and now - vm.state_since > boot_timeout
        ):
            replace.append(vm.id)
            reasons[vm.id] = f"stuck {vm.state.value} for {now - vm.state_since:.0f}s"
    return HealthPlan(tuple(unhealthy), tuple(healthy), tuple(replace), reasons)


@dataclass(frozen=True)
class IdlePlan:
    drain: tuple[str, ...] = ()  # registered runners: ask the agent to deregister first
    stop: tuple[str, ...] = ()  # free VMs with no runner, or drained ones
    undrain: tuple[str, ...] = ()  # a drain that met a job: the VM keeps it


def idle_plan(
    vms: Sequence[Vm],
    now: float,
    *,
    min_ready: int,
    idle_timeout: float,
    drain_timeout: float,
    queue_length: int,
) -> IdlePlan:
    """Scale down what has been idle past idle_timeout, keeping min_ready free VMs (the
    most recently active). Nothing is scaled down while jobs wait in the queue."""
    drain: list[str] = []
    stop: list[str] = []
    undrain: list[str] = []
    for vm in vms:
        if vm.lifecycle is not Lifecycle.DRAINING:
            continue
        busy = bool(vm.job_id or vm.reserved_job) or vm.agent is AgentState.JOB_RUNNING
        overdue = vm.state_since and now - vm.state_since > drain_timeout
        if not busy and not vm.cmd_id:
            stop.append(vm.id)  # the agent acked the drain: its runner is gone
        elif overdue:
            # A drain that met a job, or that the agent never acked: its runner may still
            # be registered and GitHub may hand it a job at any moment, so it is never
            # stopped unacked; it goes back to the pool and the next pass may drain again
            # (a dead agent is the health sweep's to replace).
            undrain.append(vm.id)
    if queue_length:
        return IdlePlan(stop=tuple(stop), undrain=tuple(undrain))
    free = sorted((vm for vm in vms if is_free(vm)), key=lambda vm: (-vm.last_active, vm.id))
    for vm in free[min_ready:]:
        if now - vm.last_active <= idle_timeout:
            continue
        (drain if vm.runner_registered else stop).append(vm.id)
    return IdlePlan(tuple(drain), tuple(stop), tuple(undrain))
