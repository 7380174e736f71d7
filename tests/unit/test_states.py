"""The effective VM state table, `is_free`, and the job transition table, as data."""

from __future__ import annotations

from itertools import product
from typing import Any

import pytest

from migctl.domain.model import (
    TERMINAL_JOB_STATES,
    AgentState,
    InfraStatus,
    JobState,
    Lifecycle,
    Vm,
    VmState,
)
from migctl.domain.states import (
    JOB_TRANSITIONS,
    ON_THE_WAY,
    IllegalTransition,
    can_move,
    check_move,
    effective_state,
    is_free,
    needs_registration,
)

In, A, L, S = InfraStatus, AgentState, Lifecycle, VmState

UP: dict[str, Any] = {"infra": In.RUNNING, "connected": True}


def vm(**fields: Any) -> Vm:
    return Vm(id="vm-1", labels=("self-hosted",), **fields)


# (id, Vm fields, expected effective state)
EFFECTIVE: list[tuple[str, dict[str, Any], VmState]] = [
    # -- the cloud says the instance is down, nobody connected ------------------------
    ("stopped", {"infra": In.STOPPED}, S.STOPPED),
    ("suspended", {"infra": In.SUSPENDED}, S.SUSPENDED),
    ("infra-stopping", {"infra": In.STOPPING}, S.STOPPING),
    ("infra-suspending", {"infra": In.SUSPENDING}, S.STOPPING),
    ("infra-deleting", {"infra": In.DELETING}, S.DELETING),
    ("infra-gone", {"infra": In.GONE}, S.DELETING),
    ("stopped-agent-said-idle", {"infra": In.STOPPED, "agent": A.IDLE}, S.STOPPED),
    ("stopped-unhealthy", {"infra": In.STOPPED, "unhealthy": True}, S.STOPPED),
    # -- on the way up ----------------------------------------------------------------
    ("creating", {"infra": In.CREATING}, S.STARTING),
    ("infra-starting", {"infra": In.STARTING}, S.STARTING),
    ("unknown-infra", {"infra": In.UNKNOWN}, S.STARTING),
    ("start-requested", {"infra": In.UNKNOWN, "lifecycle": L.STARTING}, S.STARTING),
    ("start-requested-running", {"infra": In.RUNNING, "lifecycle": L.STARTING}, S.STARTING),
    ("running-never-heard", {"infra": In.RUNNING}, S.BOOTING),
    ("running-agent-was-ready", {"infra": In.RUNNING, "agent": A.READY}, S.CONNECTING),
    ("running-agent-initializing", {"infra": In.RUNNING, "agent": A.INITIALIZING}, S.CONNECTING),
    # -- connected: the agent's word ----------------------------------------------------
    ("agent-none", {**UP, "agent": A.NONE}, S.BOOTING),
    ("agent-initializing", {**UP, "agent": A.INITIALIZING}, S.BOOTING),
    ("agent-connecting", {**UP, "agent": A.CONNECTING}, S.CONNECTING),
    ("agent-ready", {**UP, "agent": A.READY}, S.READY),
    ("agent-registering", {**UP, "agent": A.REGISTERING}, S.CONNECTING),
    ("agent-idle", {**UP, "agent": A.IDLE}, S.IDLE),
    ("agent-job-running", {**UP, "agent": A.JOB_RUNNING}, S.BUSY),
    ("agent-draining", {**UP, "agent": A.DRAINING}, S.DRAINING),
    ("agent-shutting-down", {**UP, "agent": A.SHUTTING_DOWN}, S.STOPPING),
    ("agent-error", {**UP, "agent": A.ERROR}, S.ERROR),
    # The agent's stream is the freshest news: a lagging cloud view does not hide it.
    (
        "connected-cloud-says-stopped",
        {"infra": In.STOPPED, "connected": True, "agent": A.IDLE},
        S.IDLE,
    ),
    (
        "connected-cloud-unknown",
        {"infra": In.UNKNOWN, "connected": True, "agent": A.READY},
        S.READY,
    ),
    # -- a bound job makes it BUSY whatever the agent last said ---------------------------
    ("job-bound-agent-ready", {**UP, "agent": A.READY, "job_id": "j1"}, S.BUSY),
    ("job-bound-agent-idle", {**UP, "agent": A.IDLE, "job_id": "j1"}, S.BUSY),
    ("job-bound-disconnected", {"infra": In.RUNNING, "job_id": "j1"}, S.BUSY),
    ("reserved-only-stays-ready", {**UP, "agent": A.READY, "reserved_job": "j1"}, S.READY),
    # -- health -------------------------------------------------------------------------
    ("unhealthy-ready", {**UP, "agent": A.READY, "unhealthy": True}, S.UNHEALTHY),
    (
        "unhealthy-beats-busy",
        {**UP, "agent": A.IDLE, "job_id": "j1", "unhealthy": True},
        S.UNHEALTHY,
    ),
    ("unhealthy-disconnected-running", {"infra": In.RUNNING, "unhealthy": True}, S.UNHEALTHY),
    # -- what the controller asked of it -------------------------------------------------
    ("lifecycle-stopping", {**UP, "agent": A.IDLE, "lifecycle": L.STOPPING}, S.STOPPING),
    ("lifecycle-suspending", {**UP, "agent": A.IDLE, "lifecycle": L.SUSPENDING}, S.STOPPING),
    ("lifecycle-deleting", {**UP, "agent": A.IDLE, "lifecycle": L.DELETING}, S.DELETING),
    (
        "lifecycle-stopping-busy",
        {**UP, "agent": A.JOB_RUNNING, "job_id": "j1", "lifecycle": L.STOPPING},
        S.STOPPING,
    ),
    ("lifecycle-deleting-stopped", {"infra": In.STOPPED, "lifecycle": L.DELETING}, S.DELETING),
    (
        "lifecycle-stopping-unhealthy",
        {**UP, "unhealthy": True, "lifecycle": L.STOPPING},
        S.STOPPING,
    ),
    ("lifecycle-draining-idle", {**UP, "agent": A.IDLE, "lifecycle": L.DRAINING}, S.DRAINING),
    (
        "lifecycle-draining-busy",
        {**UP, "agent": A.JOB_RUNNING, "job_id": "j1", "lifecycle": L.DRAINING},
        S.BUSY,
    ),
    (
        "lifecycle-draining-unhealthy",
        {**UP, "unhealthy": True, "lifecycle": L.DRAINING},
        S.UNHEALTHY,
    ),
    (
        "lifecycle-starting-connected-ready",
        {**UP, "agent": A.READY, "lifecycle": L.STARTING},
        S.READY,
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in EFFECTIVE], ids=[c[0] for c in EFFECTIVE]
)
def test_effective_state(fields: dict[str, Any], expected: VmState) -> None:
    record = vm(**fields)
    assert effective_state(record) is expected
    assert record.state is expected


def test_the_table_reaches_every_vm_state() -> None:
    reached = {expected for _, _, expected in EFFECTIVE}
    assert reached == set(VmState)


def test_effective_state_is_total_and_only_free_when_accepting() -> None:
    """Every combination of the partial views has one state; only a live agent accepts."""
    for infra, agent, connected, lifecycle, unhealthy, job_id in product(
        In, A, (False, True), L, (False, True), ("", "j1")
    ):
        record = vm(
            infra=infra,
            agent=agent,
            connected=connected,
            lifecycle=lifecycle,
            unhealthy=unhealthy,
            job_id=job_id,
        )
        state = effective_state(record)
        assert isinstance(state, VmState), record
        if state.accepts_job:
            assert connected and not unhealthy and not job_id, record
            assert agent in (A.READY, A.IDLE), record
            assert lifecycle in (L.NONE, L.STARTING), record
        if lifecycle in (L.STOPPING, L.SUSPENDING, L.DELETING):
            assert state in (S.STOPPING, S.DELETING), record
        if job_id and state.accepts_job:
            pytest.fail(f"a VM bound to a job is {state}: {record}")


# (id, Vm fields, free?)
FREE: list[tuple[str, dict[str, Any], bool]] = [
    ("ready", {**UP, "agent": A.READY}, True),
    ("idle-registered", {**UP, "agent": A.IDLE, "runner_registered": True}, True),
    ("ready-reserved", {**UP, "agent": A.READY, "reserved_job": "j1"}, False),
    ("idle-bound", {**UP, "agent": A.IDLE, "job_id": "j1"}, False),
    ("ready-registration-pending", {**UP, "agent": A.READY, "cmd_id": "c1"}, False),
    ("idle-registration-pending", {**UP, "agent": A.IDLE, "cmd_id": "c1"}, False),
    ("connecting", {**UP, "agent": A.CONNECTING}, False),
    ("registering", {**UP, "agent": A.REGISTERING}, False),
    ("busy", {**UP, "agent": A.JOB_RUNNING}, False),
    ("draining", {**UP, "agent": A.READY, "lifecycle": L.DRAINING}, False),
    ("stopping", {**UP, "agent": A.READY, "lifecycle": L.STOPPING}, False),
    ("unhealthy", {**UP, "agent": A.READY, "unhealthy": True}, False),
    ("disconnected-ready", {"infra": In.RUNNING, "agent": A.READY}, False),
    ("stopped", {"infra": In.STOPPED}, False),
    ("suspended", {"infra": In.SUSPENDED}, False),
    ("error", {**UP, "agent": A.ERROR}, False),
]


@pytest.mark.parametrize(("fields", "free"), [c[1:] for c in FREE], ids=[c[0] for c in FREE])
def test_is_free(fields: dict[str, Any], free: bool) -> None:
    assert is_free(vm(**fields)) is free


# (id, Vm fields, needs a register_runner?)
NEEDS_REGISTRATION: list[tuple[str, dict[str, Any], bool]] = [
    ("reserved-ready", {**UP, "agent": A.READY, "reserved_job": "j1"}, True),
    ("reserved-still-booting", {"infra": In.RUNNING, "reserved_job": "j1"}, True),
    ("reserved-connecting", {**UP, "agent": A.CONNECTING, "reserved_job": "j1"}, True),
    ("reserved-initializing", {**UP, "agent": A.INITIALIZING, "reserved_job": "j1"}, True),
    ("nothing-reserved", {**UP, "agent": A.READY}, False),
    (
        "registration-on-its-way",
        {**UP, "agent": A.READY, "reserved_job": "j1", "cmd_id": "c"},
        False,
    ),
    (
        "runner-registered",
        {**UP, "agent": A.IDLE, "reserved_job": "j1", "runner_registered": True},
        False,
    ),
    ("registering", {**UP, "agent": A.REGISTERING, "reserved_job": "j1"}, False),
    ("idle-agent", {**UP, "agent": A.IDLE, "reserved_job": "j1"}, False),
    ("job-running", {**UP, "agent": A.JOB_RUNNING, "reserved_job": "j1"}, False),
    ("draining", {**UP, "agent": A.DRAINING, "reserved_job": "j1"}, False),
    ("error", {**UP, "agent": A.ERROR, "reserved_job": "j1"}, False),
]


@pytest.mark.parametrize(
    ("fields", "needed"),
    [c[1:] for c in NEEDS_REGISTRATION],
    ids=[c[0] for c in NEEDS_REGISTRATION],
)
def test_needs_registration(fields: dict[str, Any], needed: bool) -> None:
    assert needs_registration(vm(**fields)) is needed


def test_on_the_way_is_the_boot_sequence() -> None:
    assert frozenset({S.STARTING, S.BOOTING, S.CONNECTING}) == ON_THE_WAY
    assert not any(state.accepts_job for state in ON_THE_WAY)


J = JobState
ALLOWED: set[tuple[JobState, JobState]] = {
    (J.QUEUED, J.ASSIGNED),
    (J.QUEUED, J.RUNNING),  # GitHub handed it to a runner reserved for another job
    (J.QUEUED, J.COMPLETED),
    (J.QUEUED, J.FAILED),
    (J.QUEUED, J.CANCELLED),
    (J.ASSIGNED, J.QUEUED),
    (J.ASSIGNED, J.RUNNING),
    (J.ASSIGNED, J.COMPLETED),
    (J.ASSIGNED, J.FAILED),
    (J.ASSIGNED, J.CANCELLED),
    (J.RUNNING, J.QUEUED),
    (J.RUNNING, J.COMPLETED),
    (J.RUNNING, J.FAILED),
    (J.RUNNING, J.CANCELLED),
}


@pytest.mark.parametrize(("src", "dst"), list(product(J, J)), ids=lambda s: str(s))
def test_job_transition_table(src: JobState, dst: JobState) -> None:
    allowed = (src, dst) in ALLOWED
    assert can_move(src, dst) is allowed
    if allowed:
        check_move(src, dst)
    else:
        with pytest.raises(IllegalTransition, match=f"{src} to {dst}"):
            check_move(src, dst)


def test_terminal_states_have_no_way_out() -> None:
    assert {s for s in J if s.terminal} == TERMINAL_JOB_STATES
    for src in TERMINAL_JOB_STATES:
        assert JOB_TRANSITIONS[src] == frozenset()
    assert set(JOB_TRANSITIONS) == set(J)
    assert all(src not in JOB_TRANSITIONS[src] for src in J)  # no self loops
