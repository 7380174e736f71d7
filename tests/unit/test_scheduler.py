"""The pure scheduling decisions as tables: candidates, provision, decide, oldest_match."""

from __future__ import annotations

from typing import Any

import pytest

from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.scheduler import (
    Assign,
    Decision,
    Defer,
    Limits,
    ScaleUp,
    StartStopped,
    candidates,
    decide,
    oldest_match,
    provision,
)

POOL = ("self-hosted", "linux", "x64")


def ready(vm_id: str, last_active: float = 0.0, labels: tuple[str, ...] = POOL, **more: Any) -> Vm:
    fields: dict[str, Any] = {
        "infra": InfraStatus.RUNNING,
        "connected": True,
        "agent": AgentState.READY,
        "last_active": last_active,
    }
    return Vm(id=vm_id, labels=labels, **{**fields, **more})


def idle(vm_id: str, last_active: float = 0.0, **more: Any) -> Vm:
    return ready(vm_id, last_active, agent=AgentState.IDLE, runner_registered=True, **more)


def booting(vm_id: str, **more: Any) -> Vm:
    return Vm(id=vm_id, labels=POOL, infra=InfraStatus.RUNNING, **more)


def creating(vm_id: str, **more: Any) -> Vm:
    return Vm(
        id=vm_id, labels=POOL, infra=InfraStatus.CREATING, lifecycle=Lifecycle.STARTING, **more
    )


def connecting(vm_id: str, **more: Any) -> Vm:
    return Vm(
        id=vm_id,
        labels=POOL,
        infra=InfraStatus.RUNNING,
        connected=True,
        agent=AgentState.CONNECTING,
        **more,
    )


def stopped(vm_id: str, last_active: float = 0.0) -> Vm:
    return Vm(id=vm_id, labels=POOL, infra=InfraStatus.STOPPED, last_active=last_active)


def suspended(vm_id: str, last_active: float = 0.0) -> Vm:
    return Vm(id=vm_id, labels=POOL, infra=InfraStatus.SUSPENDED, last_active=last_active)


def busy(vm_id: str) -> Vm:
    return ready(vm_id, agent=AgentState.JOB_RUNNING, job_id="running-job", runner_registered=True)


def stopping(vm_id: str) -> Vm:
    return ready(vm_id, lifecycle=Lifecycle.STOPPING)


def deleting(vm_id: str) -> Vm:
    return Vm(id=vm_id, labels=POOL, infra=InfraStatus.GONE)


def unhealthy(vm_id: str) -> Vm:
    return ready(vm_id, unhealthy=True)


def job(job_id: str = "j1", labels: tuple[str, ...] = ("self-hosted",), **more: Any) -> Job:
    return Job(id=job_id, labels=labels, **more)


# -- candidates ------------------------------------------------------------------------------

CANDIDATES: list[tuple[str, tuple[str, ...], list[Vm], list[str]]] = [
    ("none", ("self-hosted",), [], []),
    ("one-ready", ("self-hosted",), [ready("a")], ["a"]),
    ("idle-registered-counts", ("linux",), [idle("a")], ["a"]),
    ("empty-job-labels-any-vm", (), [ready("a"), ready("b", labels=())], ["a", "b"]),
    ("label-not-covered", ("gpu",), [ready("a")], []),
    ("every-label-must-be-covered", ("linux", "gpu"), [ready("a")], []),
    ("subset-covered", ("x64", "self-hosted"), [ready("a")], ["a"]),
    ("case-insensitive-job", ("Self-Hosted", "LINUX"), [ready("a")], ["a"]),
    ("case-insensitive-vm", ("linux",), [ready("a", labels=("Linux",))], ["a"]),
    (
        "vm-with-other-labels",
        ("gpu",),
        [ready("a"), ready("g", labels=("self-hosted", "GPU"))],
        ["g"],
    ),
    (
        "most-recently-active-first",
        ("linux",),
        [ready("old", 10.0), ready("new", 30.0), ready("mid", 20.0)],
        ["new", "mid", "old"],
    ),
    (
        "ties-by-id",
        ("linux",),
        [ready("b", 5.0), ready("a", 5.0), ready("c", 6.0)],
        ["c", "a", "b"],
    ),
    (
        "only-free-vms",
        ("linux",),
        [
            ready("reserved", 9.0, reserved_job="other"),
            ready("pending", 9.0, cmd_id="c1"),
            busy("busy"),
            booting("booting"),
            connecting("connecting"),
            stopped("stopped", 9.0),
            suspended("suspended", 9.0),
            stopping("stopping"),
            unhealthy("sick"),
            ready("free", 1.0),
        ],
        ["free"],
    ),
]


@pytest.mark.parametrize(
    ("labels", "vms", "expected"), [c[1:] for c in CANDIDATES], ids=[c[0] for c in CANDIDATES]
)
def test_candidates(labels: tuple[str, ...], vms: list[Vm], expected: list[str]) -> None:
    assert [vm.id for vm in candidates(job(labels=labels), vms)] == expected


# -- provision -------------------------------------------------------------------------------

LIMITS = Limits(max_vms=10, max_scale_up_per_minute=10, max_concurrent_assignments=10)

# (id, demand, vms, limits, scaled in the last minute, expected decision)
PROVISION: list[tuple[str, int, list[Vm], Limits, int, Decision]] = [
    ("empty-pool-creates", 1, [], LIMITS, 0, ScaleUp(1)),
    ("creates-one-per-demand", 3, [], LIMITS, 0, ScaleUp(3)),
    ("no-demand", 0, [], LIMITS, 0, Defer("waiting for 0 VM(s) already on the way")),
    (
        "booting-counts",
        1,
        [booting("b")],
        LIMITS,
        0,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
    (
        "creating-counts",
        1,
        [creating("c")],
        LIMITS,
        0,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
    (
        "connecting-counts",
        1,
        [connecting("c")],
        LIMITS,
        0,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
    (
        "free-counts",
        2,
        [ready("r"), idle("i")],
        LIMITS,
        0,
        Defer("waiting for 2 VM(s) already on the way"),
    ),
    ("only-the-shortfall", 3, [booting("b")], LIMITS, 0, ScaleUp(2)),
    ("free-and-booting-subtracted", 4, [ready("r"), booting("b")], LIMITS, 0, ScaleUp(2)),
    # A VM that already holds demand is not capacity for more.
    ("reserved-ready-is-not-capacity", 1, [ready("r", reserved_job="j0")], LIMITS, 0, ScaleUp(1)),
    (
        "reserved-booting-is-not-capacity",
        1,
        [connecting("c", reserved_job="j0")],
        LIMITS,
        0,
        ScaleUp(1),
    ),
    ("registration-pending-is-not-capacity", 1, [ready("r", cmd_id="c1")], LIMITS, 0, ScaleUp(1)),
    ("busy-is-not-capacity", 1, [busy("b")], LIMITS, 0, ScaleUp(1)),
    ("stopping-is-not-capacity", 1, [stopping("s")], LIMITS, 0, ScaleUp(1)),
    ("unhealthy-is-not-capacity", 1, [unhealthy("u")], LIMITS, 0, ScaleUp(1)),
    # Resume suspended before starting stopped before creating.
    ("resume-suspended", 1, [stopped("t"), suspended("s")], LIMITS, 0, StartStopped(resume=("s",))),
    ("start-stopped", 1, [stopped("t")], LIMITS, 0, StartStopped(start=("t",))),
    (
        "resume-then-start",
        2,
        [stopped("t"), suspended("s")],
        LIMITS,
        0,
        StartStopped(start=("t",), resume=("s",)),
    ),
    (
        "resume-start-then-create",
        4,
        [stopped("t"), suspended("s")],
        LIMITS,
        0,
        StartStopped(start=("t",), resume=("s",), then_create=2),
    ),
    (
        "most-recently-active-stopped-first",
        2,
        [stopped("t1", 1.0), stopped("t3", 3.0), stopped("t2", 2.0)],
        LIMITS,
        0,
        StartStopped(start=("t3", "t2")),
    ),
    (
        "most-recently-active-suspended-first",
        1,
        [suspended("s1", 1.0), suspended("s2", 2.0)],
        LIMITS,
        0,
        StartStopped(resume=("s2",)),
    ),
    (
        "on-the-way-before-waking",
        1,
        [booting("b"), stopped("t")],
        LIMITS,
        0,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
    # max_vms: every VM but a deleted one counts.
    ("max-vms-caps-create", 5, [], Limits(max_vms=2), 0, ScaleUp(2)),
    (
        "max-vms-reached",
        1,
        [busy("a"), busy("b")],
        Limits(max_vms=2),
        0,
        Defer("max_vms (2) reached"),
    ),
    (
        "stopping-counts-toward-max",
        1,
        [busy("a"), stopping("b")],
        Limits(max_vms=2),
        0,
        Defer("max_vms (2) reached"),
    ),
    ("deleting-not-counted", 1, [busy("a"), deleting("d")], Limits(max_vms=2), 0, ScaleUp(1)),
    (
        "stopped-counted-start-then-room",
        3,
        [busy("a"), stopped("t")],
        Limits(max_vms=3),
        0,
        StartStopped(start=("t",), then_create=1),
    ),
    (
        "start-even-at-max",
        2,
        [busy("a"), stopped("t")],
        Limits(max_vms=2),
        0,
        StartStopped(start=("t",), then_create=0),
    ),
    # max_scale_up_per_minute: starts and creates share the budget.
    ("budget-caps-create", 5, [], Limits(max_scale_up_per_minute=2), 0, ScaleUp(2)),
    ("budget-partly-spent", 5, [], Limits(max_scale_up_per_minute=2), 1, ScaleUp(1)),
    (
        "budget-spent",
        5,
        [],
        Limits(max_scale_up_per_minute=2),
        2,
        Defer("max_scale_up_per_minute reached; retrying next minute"),
    ),
    (
        "budget-overspent",
        1,
        [],
        Limits(max_scale_up_per_minute=2),
        7,
        Defer("max_scale_up_per_minute reached; retrying next minute"),
    ),
    (
        "budget-caps-starts",
        3,
        [stopped("t1", 1.0), stopped("t2", 2.0), suspended("s")],
        Limits(max_scale_up_per_minute=2),
        0,
        StartStopped(start=("t2",), resume=("s",)),
    ),
    (
        "budget-caps-resume-start-create",
        9,
        [stopped("t"), suspended("s")],
        Limits(max_scale_up_per_minute=3),
        0,
        StartStopped(start=("t",), resume=("s",), then_create=1),
    ),
    (
        "on-the-way-checked-before-budget",
        1,
        [booting("b")],
        Limits(max_scale_up_per_minute=1),
        5,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
]


@pytest.mark.parametrize(
    ("demand", "vms", "limits", "scaled", "expected"),
    [c[1:] for c in PROVISION],
    ids=[c[0] for c in PROVISION],
)
def test_provision(
    demand: int, vms: list[Vm], limits: Limits, scaled: int, expected: Decision
) -> None:
    assert provision(demand, vms, limits, scaled) == expected


@pytest.mark.parametrize("demand", range(0, 8))
@pytest.mark.parametrize("scaled", range(0, 4))
def test_provision_never_exceeds_budget_or_max(demand: int, scaled: int) -> None:
    vms = [busy("a"), stopped("t1", 1.0), stopped("t2", 2.0), suspended("s"), booting("b")]
    limits = Limits(max_vms=7, max_scale_up_per_minute=3)
    decision = provision(demand, vms, limits, scaled)
    if isinstance(decision, StartStopped):
        woken = len(decision.start) + len(decision.resume)
        added = woken + decision.then_create
        assert woken > 0
        assert len(set(decision.start) | set(decision.resume)) == woken
        assert len(vms) + decision.then_create <= limits.max_vms
    elif isinstance(decision, ScaleUp):
        added = decision.count
        assert decision.count > 0
        assert len(vms) + decision.count <= limits.max_vms
    else:
        added = 0
    assert added <= max(0, limits.max_scale_up_per_minute - scaled)
    assert added <= max(0, demand - 1)  # the booting VM is already on its way


# -- decide ------------------------------------------------------------------------------

# (id, job, vms, demand, in flight, scaled, limits, expected)
DECIDE: list[tuple[str, Job, list[Vm], int, int, int, Limits, Decision]] = [
    ("assign-free", job(), [ready("a")], 1, 0, 0, LIMITS, Assign(("a",))),
    (
        "assign-in-candidate-order",
        job(),
        [ready("a", 1.0), idle("b", 3.0), ready("c", 2.0), busy("d")],
        1,
        0,
        0,
        LIMITS,
        Assign(("b", "c", "a")),
    ),
    (
        "assign-case-insensitive",
        job(labels=("LINUX",)),
        [ready("a")],
        1,
        0,
        0,
        LIMITS,
        Assign(("a",)),
    ),
    (
        "max-concurrent-assignments",
        job(),
        [ready("a")],
        1,
        3,
        0,
        Limits(max_concurrent_assignments=3),
        Defer("max_concurrent_assignments reached"),
    ),
    (
        "under-max-concurrent-assignments",
        job(),
        [ready("a")],
        1,
        2,
        0,
        Limits(max_concurrent_assignments=3),
        Assign(("a",)),
    ),
    (
        "in-flight-does-not-block-provisioning",
        job(),
        [],
        1,
        99,
        0,
        Limits(max_concurrent_assignments=3),
        ScaleUp(1),
    ),
    (
        "not-covering-provisions",
        job(labels=("gpu",)),
        [busy("a")],
        1,
        0,
        0,
        LIMITS,
        ScaleUp(1),
    ),
    (
        "no-free-start-stopped",
        job(),
        [busy("a"), stopped("t")],
        1,
        0,
        0,
        LIMITS,
        StartStopped(start=("t",)),
    ),
    (
        "no-free-resume",
        job(),
        [suspended("s"), stopped("t")],
        1,
        0,
        0,
        LIMITS,
        StartStopped(resume=("s",)),
    ),
    ("no-vm-scale-up", job(), [], 1, 0, 0, LIMITS, ScaleUp(1)),
    ("demand-zero-counts-this-job", job(), [], 0, 0, 0, LIMITS, ScaleUp(1)),
    ("demand-scales-several", job(), [], 3, 0, 0, LIMITS, ScaleUp(3)),
    (
        "wait-for-booting",
        job(),
        [booting("b")],
        1,
        0,
        0,
        LIMITS,
        Defer("waiting for 1 VM(s) already on the way"),
    ),
    (
        "scale-budget",
        job(),
        [],
        1,
        0,
        5,
        Limits(max_scale_up_per_minute=5),
        Defer("max_scale_up_per_minute reached; retrying next minute"),
    ),
    ("max-vms", job(), [busy("a")], 1, 0, 0, Limits(max_vms=1), Defer("max_vms (1) reached")),
    (
        "assigned-job",
        job(state=JobState.ASSIGNED),
        [ready("a")],
        1,
        0,
        0,
        LIMITS,
        Defer("job is ASSIGNED, not QUEUED"),
    ),
    (
        "running-job",
        job(state=JobState.RUNNING),
        [],
        1,
        0,
        0,
        LIMITS,
        Defer("job is RUNNING, not QUEUED"),
    ),
    (
        "completed-job",
        job(state=JobState.COMPLETED),
        [ready("a")],
        1,
        0,
        0,
        LIMITS,
        Defer("job is COMPLETED, not QUEUED"),
    ),
    (
        "cancelled-job",
        job(state=JobState.CANCELLED),
        [],
        1,
        0,
        0,
        LIMITS,
        Defer("job is CANCELLED, not QUEUED"),
    ),
]


@pytest.mark.parametrize(
    ("the_job", "vms", "demand", "in_flight", "scaled", "limits", "expected"),
    [c[1:] for c in DECIDE],
    ids=[c[0] for c in DECIDE],
)
def test_decide(
    the_job: Job,
    vms: list[Vm],
    demand: int,
    in_flight: int,
    scaled: int,
    limits: Limits,
    expected: Decision,
) -> None:
    got = decide(
        the_job,
        vms,
        demand=demand,
        limits=limits,
        assignments_in_flight=in_flight,
        scaled_last_minute=scaled,
    )
    assert got == expected


# -- oldest_match --------------------------------------------------------------------------

QUEUE = [
    job("gpu-1", labels=("gpu",)),
    job("assigned", labels=("linux",), state=JobState.ASSIGNED),
    job("linux-1", labels=("Linux",)),
    job("any-1", labels=("self-hosted",)),
]

OLDEST: list[tuple[str, Vm, list[Job], str | None]] = [
    ("empty-queue", ready("a"), [], None),
    ("first-covered-in-queue-order", ready("a"), QUEUE, "linux-1"),
    ("gpu-vm-takes-gpu-job", ready("g", labels=("self-hosted", "GPU")), QUEUE, "gpu-1"),
    ("skips-non-queued", ready("a"), [QUEUE[1], QUEUE[3]], "any-1"),
    ("nothing-covered", ready("a", labels=("windows",)), QUEUE, None),
    ("terminal-ignored", ready("a"), [job("done", state=JobState.COMPLETED)], None),
]


@pytest.mark.parametrize(
    ("the_vm", "queued", "expected"), [c[1:] for c in OLDEST], ids=[c[0] for c in OLDEST]
)
def test_oldest_match(the_vm: Vm, queued: list[Job], expected: str | None) -> None:
    got = oldest_match(the_vm, queued)
    assert (got.id if got else None) == expected
