"""Legal state transitions, as data, and the effective VM state calculation.

The effective state is a pure function of what the cloud, the agent and the controller
each say about a VM (the seed's infra × agent × runner table). The Go controller kept
this inside its Redis store; here it lives in the domain and the store only persists.
"""

from __future__ import annotations

from migctl.domain.model import AgentState, InfraStatus, JobState, Lifecycle, Vm, VmState

J = JobState

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.QUEUED: frozenset({J.ASSIGNED, J.RUNNING, J.COMPLETED, J.FAILED, J.CANCELLED}),
    # ASSIGNED -> QUEUED: the runner never took it (timeout, crash, handed another job).
    J.ASSIGNED: frozenset({J.QUEUED, J.RUNNING, J.COMPLETED, J.FAILED, J.CANCELLED}),
    # RUNNING -> QUEUED: the VM died before the job could finish (bounded retry).
    J.RUNNING: frozenset({J.QUEUED, J.COMPLETED, J.FAILED, J.CANCELLED}),
    J.COMPLETED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the tables do not allow; the caller's view of the world is stale."""


def can_move(src: JobState, dst: JobState) -> bool:
    return dst in JOB_TRANSITIONS[src]


def check_move(src: JobState, dst: JobState) -> None:
    if not can_move(src, dst):
        raise IllegalTransition(f"job cannot go from {src} to {dst}")


_INFRA_DOWN = {
    InfraStatus.STOPPED: VmState.STOPPED,
    InfraStatus.SUSPENDED: VmState.SUSPENDED,
    InfraStatus.STOPPING: VmState.STOPPING,
    InfraStatus.SUSPENDING: VmState.STOPPING,
    InfraStatus.DELETING: VmState.DELETING,
    InfraStatus.GONE: VmState.DELETING,
}

_LIFECYCLE_DOWN = {
    Lifecycle.STOPPING: VmState.STOPPING,
    Lifecycle.SUSPENDING: VmState.STOPPING,
    Lifecycle.DELETING: VmState.DELETING,
}

_AGENT_UP = {
    AgentState.NONE: VmState.BOOTING,
    AgentState.INITIALIZING: VmState.BOOTING,
    AgentState.CONNECTING: VmState.CONNECTING,
    AgentState.READY: VmState.READY,
    AgentState.REGISTERING: VmState.CONNECTING,
    AgentState.IDLE: VmState.IDLE,
    AgentState.JOB_RUNNING: VmState.BUSY,
    AgentState.DRAINING: VmState.DRAINING,
    AgentState.SHUTTING_DOWN: VmState.STOPPING,
    AgentState.ERROR: VmState.ERROR,
}


def effective_state(vm: Vm) -> VmState:
    """One state for people and for the scheduler, from the three partial views."""
    if vm.lifecycle in _LIFECYCLE_DOWN:
        return _LIFECYCLE_DOWN[vm.lifecycle]
    if not vm.connected and vm.infra in _INFRA_DOWN:
        return _INFRA_DOWN[vm.infra]
    if vm.unhealthy:
        return VmState.UNHEALTHY
    if vm.job_id:
        return VmState.BUSY
    if vm.lifecycle is Lifecycle.DRAINING:
        return VmState.DRAINING
    if not vm.connected:
        if (
            vm.infra in (InfraStatus.CREATING, InfraStatus.STARTING)
            or vm.lifecycle is Lifecycle.STARTING
        ):
            return VmState.STARTING
        if vm.infra is InfraStatus.RUNNING:
            # Running but the agent has not (re)connected yet.
            return VmState.CONNECTING if vm.agent is not AgentState.NONE else VmState.BOOTING
        return VmState.STARTING if vm.infra is InfraStatus.UNKNOWN else VmState.ERROR
    return _AGENT_UP[vm.agent]


def is_free(vm: Vm) -> bool:
    """READY or IDLE, connected, and holding no unit of demand: may be claimed for a job."""
    return vm.state.accepts_job and not vm.reserved_job and not vm.job_id and not vm.cmd_id


ON_THE_WAY = frozenset({VmState.STARTING, VmState.BOOTING, VmState.CONNECTING})
"""States of a VM that will be ready soon without further action."""


_WAITING_FOR_A_RUNNER = frozenset(
    {AgentState.NONE, AgentState.INITIALIZING, AgentState.CONNECTING, AgentState.READY}
)


def needs_registration(vm: Vm) -> bool:
    """The VM holds demand but has no runner and no registration on its way: it needs a
    `register_runner`, whichever job its reservation is for now (a runner serves demand,
    not one job)."""
    return (
        bool(vm.reserved_job)
        and not vm.runner_registered
        and not vm.cmd_id
        and vm.agent in _WAITING_FOR_A_RUNNER
    )
