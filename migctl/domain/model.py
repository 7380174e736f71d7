"""Jobs and VMs as plain values, and the states they move through.

Pure: no I/O. The Redis store persists these; the services decide with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class VmState(StrEnum):
    """Effective VM states: the seed's eight plus the ones the pool policy needs."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    BOOTING = "BOOTING"
    CONNECTING = "CONNECTING"
    READY = "READY"
    IDLE = "IDLE"
    BUSY = "BUSY"
    ERROR = "ERROR"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"
    SUSPENDED = "SUSPENDED"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"

    @property
    def accepts_job(self) -> bool:
        return self in (VmState.READY, VmState.IDLE)


class InfraStatus(StrEnum):
    """What the cloud says of a VM, mapped from the provider's vocabulary at the adapter."""

    CREATING = "CREATING"  # exists in the MIG, instance not yet running
    STARTING = "STARTING"  # start/resume requested or in progress
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    SUSPENDING = "SUSPENDING"
    SUSPENDED = "SUSPENDED"
    DELETING = "DELETING"
    GONE = "GONE"
    UNKNOWN = "UNKNOWN"


class AgentState(StrEnum):
    """`Heartbeat.miglet_state` as deployed agents report it (PROTOCOL.md)."""

    NONE = ""  # never heard from
    INITIALIZING = "initializing"
    CONNECTING = "connecting"
    READY = "ready"
    REGISTERING = "registering_runner"
    IDLE = "idle"
    JOB_RUNNING = "job_running"
    DRAINING = "draining"
    SHUTTING_DOWN = "shutting_down"
    ERROR = "error"

    @classmethod
    def parse(cls, text: str) -> AgentState:
        try:
            return cls(text)
        except ValueError:
            return cls.NONE


class Lifecycle(StrEnum):
    """What the controller has asked of a VM and not yet seen done."""

    NONE = ""
    STARTING = "starting"
    STOPPING = "stopping"
    SUSPENDING = "suspending"
    DELETING = "deleting"
    DRAINING = "draining"


def covers(vm_labels: Iterable[str], job_labels: Iterable[str]) -> bool:
    """A runner can take a job when its labels cover the job's (case-insensitive, as GitHub)."""
    have = {label.lower() for label in vm_labels}
    return all(label.lower() in have for label in job_labels)


def label_key(labels: Iterable[str]) -> str:
    """Canonical key of a label set, for counting demand per set."""
    return ",".join(sorted({label.lower() for label in labels}))


@dataclass(frozen=True)
class Job:
    id: str
    labels: tuple[str, ...]
    state: JobState = JobState.QUEUED
    pool_id: str = ""
    org: str = ""
    repo: str = ""
    run_id: str = ""
    installation_id: int = 0
    priority: int = 0
    received_at: float = 0.0
    vm_id: str = ""  # reserved (ASSIGNED) or bound (RUNNING) VM
    retries: int = 0
    reason: str = ""
    updated_at: float = 0.0
    assigned_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    conclusion: str = ""  # success / failure / cancelled, as the runner or GitHub said
    lost_at: float = 0.0  # RUNNING, but its VM was lost then: GitHub will fail it

    def with_(self, **changes: object) -> Job:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Vm:
    id: str
    labels: tuple[str, ...] = ()
    infra: InfraStatus = InfraStatus.UNKNOWN
    agent: AgentState = AgentState.NONE
    lifecycle: Lifecycle = Lifecycle.NONE
    connected: bool = False
    runner_registered: bool = False
    reserved_job: str = ""  # the unit of demand this VM's runner was provisioned for
    job_id: str = ""  # the job GitHub actually handed the runner (from job_started)
    unhealthy: bool = False
    created_at: float = 0.0
    state_since: float = 0.0  # when lifecycle/infra last changed (for stuck detection)
    last_heartbeat: float = 0.0
    last_active: float = 0.0  # last time it ran or finished a job, or became ready
    capabilities: tuple[str, ...] = ()
    cmd_id: str = ""  # a register_runner sent and not yet acked: the VM is not free meanwhile
    reserved_at: float = 0.0
    cmd_sent_at: float = 0.0  # when `cmd_id` was sent: an unacked command expires from here
    start_requested_at: float = 0.0  # create/start/resume asked; cleared when its agent is ready
    session: str = (
        ""  # the gateway stream that holds the agent, so a stale one cannot disconnect it
    )
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def state(self) -> VmState:
        from migctl.domain.states import effective_state

        return effective_state(self)

    def with_(self, **changes: object) -> Vm:
        return replace(self, **changes)  # type: ignore[arg-type]
