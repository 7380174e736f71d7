"""Every transition function as a table of cases: records in, the `Change` out.

GitHub hands a queued job to ANY matching runner, so a job binds to a VM on
`job_started`; the reservation of the VM that started it moves to the VM the started job
had reserved (a swap) or goes back to the queue (PROTOCOL.md, last section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from migctl.domain import transitions as t
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.transitions import Change

NOW = 1_000.0
EARLIER = 500.0
MAX = 3
LABELS = ("self-hosted", "linux")


def vm(vm_id: str, **fields: Any) -> Vm:
    base: dict[str, Any] = {
        "labels": LABELS,
        "infra": InfraStatus.RUNNING,
        "connected": True,
        "agent": AgentState.IDLE,
        "runner_registered": True,
        "last_active": EARLIER,
    }
    return Vm(id=vm_id, **{**base, **fields})


def job(job_id: str, state: JobState = JobState.QUEUED, vm_id: str = "", **fields: Any) -> Job:
    return Job(id=job_id, labels=("linux",), state=state, vm_id=vm_id, received_at=1.0, **fields)


def assigned(job_id: str, vm_id: str, **fields: Any) -> Job:
    return job(job_id, JobState.ASSIGNED, vm_id, assigned_at=EARLIER, **fields)


def running(job_id: str, vm_id: str, **fields: Any) -> Job:
    return job(job_id, JobState.RUNNING, vm_id, started_at=EARLIER, run_id="r1", **fields)


@dataclass
class Expect:
    """The records a Change must hold (exactly these ids), and its follow-ups."""

    jobs: dict[str, Job] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    requeued: list[str] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    note: str = ""


def check(change: Change, want: Expect) -> None:
    assert change.jobs == want.jobs
    assert change.vms == want.vms
    assert change.requeued == want.requeued
    assert change.freed == want.freed
    if want.note:
        assert any(want.note in note for note in change.notes), change.notes
    assert change.empty is (not want.jobs and not want.vms)


def bound(v: Vm, job_id: str) -> Vm:
    """What `job_started` makes of the VM that started `job_id`."""
    return v.with_(
        job_id=job_id, reserved_job="", reserved_at=0.0, last_active=NOW, runner_registered=True
    )


def started(j: Job, vm_id: str, run_id: str = "r9") -> Job:
    return j.with_(
        state=JobState.RUNNING,
        vm_id=vm_id,
        run_id=j.run_id or run_id,
        started_at=NOW,
        updated_at=NOW,
        reason="",
    )


def back(j: Job, reason: str, retries: int | None = None) -> Job:
    return j.with_(
        state=JobState.QUEUED,
        vm_id="",
        retries=j.retries if retries is None else retries,
        reason=reason,
        updated_at=NOW,
    )


def gave_up(j: Job, reason: str) -> Job:
    return j.with_(
        state=JobState.FAILED,
        vm_id="",
        retries=j.retries + 1,
        reason=f"{reason}; gave up after {MAX} retries",
        updated_at=NOW,
        finished_at=NOW,
    )


# -- requeue -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries", "count", "state", "after"),
    [
        (0, True, JobState.QUEUED, 1),
        (MAX - 1, True, JobState.QUEUED, MAX),
        (MAX, True, JobState.FAILED, MAX + 1),
        (MAX, False, JobState.QUEUED, MAX),  # a moved reservation is no fault of the job
        (MAX + 5, False, JobState.QUEUED, MAX + 5),
    ],
)
def test_requeue(retries: int, count: bool, state: JobState, after: int) -> None:
    j = assigned("a", "v1", retries=retries)
    new = t.requeue(j, NOW, "why", MAX, count=count)
    assert (new.state, new.retries, new.vm_id, new.updated_at) == (state, after, "", NOW)
    assert new.reason.startswith("why")
    assert new.finished_at == (NOW if state is JobState.FAILED else 0.0)


# -- job_started -----------------------------------------------------------------------------

V = vm("v", reserved_job="a", reserved_at=EARLIER)
W = vm("w", reserved_job="b", reserved_at=EARLIER)
A_ON_V = assigned("a", "v")
B_ON_W = assigned("b", "w")
TOOK = "runner on v took another job"

# (id, vm, job, reserved, other_vm, expected)
JOB_STARTED: list[tuple[str, Vm, Job, Job | None, Vm | None, Expect]] = [
    (
        "own-reservation",
        V,
        A_ON_V,
        None,
        None,
        Expect(jobs={"a": started(A_ON_V, "v")}, vms={"v": bound(V, "a")}),
    ),
    (
        "own-reservation-keeps-known-run-id",
        V,
        A_ON_V.with_(run_id="r1"),
        None,
        None,
        Expect(jobs={"a": started(A_ON_V.with_(run_id="r1"), "v")}, vms={"v": bound(V, "a")}),
    ),
    (
        "clears-the-reason-of-an-earlier-retry",
        V,
        A_ON_V.with_(reason="no runner started it", retries=1),
        None,
        None,
        Expect(jobs={"a": started(A_ON_V.with_(retries=1), "v")}, vms={"v": bound(V, "a")}),
    ),
    (
        "handed-a-queued-job-reservation-requeued-uncounted",
        V,
        job("b"),
        A_ON_V,
        None,
        Expect(
            jobs={"b": started(job("b"), "v"), "a": back(A_ON_V, TOOK)},
            vms={"v": bound(V, "b")},
            requeued=["a"],
        ),
    ),
    (
        "requeue-is-uncounted-even-at-max-retries",
        V,
        job("b"),
        A_ON_V.with_(retries=MAX),
        None,
        Expect(
            jobs={"b": started(job("b"), "v"), "a": back(A_ON_V.with_(retries=MAX), TOOK)},
            vms={"v": bound(V, "b")},
            requeued=["a"],
        ),
    ),
    (
        "handed-a-job-assigned-elsewhere-swap",
        V,
        B_ON_W,
        A_ON_V,
        W,
        Expect(
            jobs={"b": started(B_ON_W, "v"), "a": A_ON_V.with_(vm_id="w", updated_at=NOW)},
            vms={"v": bound(V, "b"), "w": W.with_(reserved_job="a", reserved_at=NOW)},
            note="job a now waits for the runner on w",
        ),
    ),
    (
        "other-vm-re-reserved-meanwhile-left-alone",
        V,
        B_ON_W,
        A_ON_V,
        W.with_(reserved_job="c"),
        Expect(
            jobs={"b": started(B_ON_W, "v"), "a": back(A_ON_V, TOOK)},
            vms={"v": bound(V, "b")},
            requeued=["a"],
        ),
    ),
    (
        "no-reservation-here-other-vm-released",
        V.with_(reserved_job="", reserved_at=0.0),
        B_ON_W,
        None,
        W,
        Expect(
            jobs={"b": started(B_ON_W, "v")},
            vms={"v": bound(V, "b"), "w": W.with_(reserved_job="", reserved_at=0.0)},
            freed=["w"],
        ),
    ),
    (
        "no-reservation-anywhere",
        V.with_(reserved_job="", reserved_at=0.0),
        job("b"),
        None,
        None,
        Expect(jobs={"b": started(job("b"), "v")}, vms={"v": bound(V, "b")}),
    ),
    (
        "reservation-already-cancelled-not-requeued",
        V,
        job("b"),
        job("a", JobState.CANCELLED, "v"),
        None,
        Expect(jobs={"b": started(job("b"), "v")}, vms={"v": bound(V, "b")}),
    ),
    (
        "reservation-moved-to-another-vm-left-alone",
        V,
        job("b"),
        assigned("a", "x"),
        None,
        Expect(jobs={"b": started(job("b"), "v")}, vms={"v": bound(V, "b")}),
    ),
    (
        "unknown-job-recorded-running",
        V.with_(reserved_job="", reserved_at=0.0),
        Job(id="new", labels=()),
        None,
        None,
        Expect(
            jobs={"new": started(Job(id="new", labels=()), "v")},
            vms={"v": bound(V.with_(reserved_job=""), "new")},
        ),
    ),
    (
        "duplicate-start",
        bound(V, "a"),
        running("a", "v"),
        None,
        None,
        Expect(),
    ),
    (
        "start-from-a-second-vm-ignored",
        V,
        running("b", "x"),
        A_ON_V,
        None,
        Expect(note="job b already running on x; start from v ignored"),
    ),
    (
        "late-start-of-a-job-this-vm-completed",
        V.with_(reserved_job="", reserved_at=0.0, runner_registered=False),
        job("a", JobState.COMPLETED, "v", conclusion="success"),
        None,
        None,
        Expect(note="job a already COMPLETED; start ignored"),
    ),
    (
        "start-of-a-job-cancelled-while-reserved-here-drops-the-reservation",
        V,
        job("a", JobState.CANCELLED, "v"),
        None,
        None,
        Expect(vms={"v": V.with_(reserved_job="", reserved_at=0.0, last_active=NOW)}),
    ),
    (
        "start-of-a-cancelled-job-ignored",
        vm("v"),
        job("a", JobState.CANCELLED),
        None,
        None,
        Expect(note="already CANCELLED"),
    ),
]


@pytest.mark.parametrize(
    ("the_vm", "the_job", "reserved", "other", "want"),
    [c[1:] for c in JOB_STARTED],
    ids=[c[0] for c in JOB_STARTED],
)
def test_job_started(
    the_vm: Vm, the_job: Job, reserved: Job | None, other: Vm | None, want: Expect
) -> None:
    change = t.job_started(the_vm, the_job, reserved=reserved, other_vm=other, run_id="r9", now=NOW)
    check(change, want)


def test_job_started_of_a_job_ended_elsewhere_releases_the_consumed_reservation() -> None:
    """GitHub may hand our runner on `v` (reserved for `a`) a job `b` that we already hold
    as terminal: its `completed` webhook was applied first (Pub/Sub and Celery reorder),
    or we gave up on it (FAILED) while GitHub still had it queued. The ephemeral runner
    on `v` is consumed all the same: `a` goes back to the queue, uncounted."""
    b_done = job("b", JobState.COMPLETED, "w", conclusion="success", finished_at=EARLIER)
    change = t.job_started(V, b_done, reserved=A_ON_V, other_vm=None, run_id="r9", now=NOW)
    assert change.requeued == ["a"]
    assert change.jobs["a"] == back(A_ON_V, TOOK)
    assert change.vms["v"].reserved_job == ""
    assert "b" not in change.jobs  # terminal stays terminal


def test_job_started_of_a_given_up_job_releases_the_consumed_reservation() -> None:
    b_failed = job("b", JobState.FAILED, "", reason="gave up", finished_at=EARLIER)
    change = t.job_started(V, b_failed, reserved=A_ON_V, other_vm=None, run_id="r9", now=NOW)
    assert change.requeued == ["a"]
    assert change.vms["v"].reserved_job == ""
    assert "b" not in change.jobs


def test_late_duplicate_start_of_a_job_this_vm_completed_keeps_its_new_reservation() -> None:
    """BUG (domain/transitions.py, `job_started`, terminal branch): the in_progress
    webhook and the agent's `job_started` of job `j` both arrive; when one of them is
    applied late — after `j` completed on `v` and `v` was re-registered for the next job
    `a` — the terminal branch treats it like a job that consumed `v`'s runner and
    releases `a` (requeued; another VM may be provisioned for it) although `v`'s new
    runner is alive and reserved for it. `j.vm_id == v` says this VM already ran `j`: a
    duplicate to ignore."""
    j_done = job("j", JobState.COMPLETED, "v", conclusion="success", finished_at=EARLIER)
    v_again = V.with_(cmd_id="c2", runner_registered=False, agent=AgentState.REGISTERING)
    change = t.job_started(v_again, j_done, reserved=A_ON_V, other_vm=None, run_id="r9", now=NOW)
    assert change.empty, change
    assert change.requeued == []


# -- job_completed ---------------------------------------------------------------------------


def done(j: Job, vm_id: str, success: bool = True) -> Job:
    return j.with_(
        state=JobState.COMPLETED,
        vm_id=vm_id,
        conclusion="success" if success else "failure",
        finished_at=NOW,
        updated_at=NOW,
    )


def spent(v: Vm) -> Vm:
    """The VM after its ephemeral runner finished a job."""
    return v.with_(job_id="", runner_registered=False, last_active=NOW)


RUNNING_V = bound(V, "a").with_(last_active=EARLIER)
A_RUNNING = running("a", "v")

# (id, vm, job, success, reserved, other, expected)
JOB_COMPLETED: list[tuple[str, Vm, Job, bool, Job | None, Vm | None, Expect]] = [
    (
        "normal",
        RUNNING_V,
        A_RUNNING,
        True,
        None,
        None,
        Expect(jobs={"a": done(A_RUNNING, "v")}, vms={"v": spent(RUNNING_V)}),
    ),
    (
        "success-false-is-a-failure-conclusion",
        RUNNING_V,
        A_RUNNING,
        False,
        None,
        None,
        Expect(jobs={"a": done(A_RUNNING, "v", success=False)}, vms={"v": spent(RUNNING_V)}),
    ),
    (
        "before-job-started-own-reservation",
        V,
        A_ON_V,
        True,
        None,
        None,
        Expect(jobs={"a": done(started(A_ON_V, "v"), "v")}, vms={"v": spent(bound(V, "a"))}),
    ),
    (
        "before-job-started-handed-queued-job",
        V,
        job("b"),
        True,
        A_ON_V,
        None,
        Expect(
            jobs={"b": done(started(job("b"), "v"), "v"), "a": back(A_ON_V, TOOK)},
            vms={"v": spent(bound(V, "b"))},
            requeued=["a"],
        ),
    ),
    (
        "before-job-started-swap",
        V,
        B_ON_W,
        False,
        A_ON_V,
        W,
        Expect(
            jobs={
                "b": done(started(B_ON_W, "v"), "v", success=False),
                "a": A_ON_V.with_(vm_id="w", updated_at=NOW),
            },
            vms={"v": spent(bound(V, "b")), "w": W.with_(reserved_job="a", reserved_at=NOW)},
        ),
    ),
    (
        "unknown-job",
        vm("v"),
        Job(id="new", labels=()),
        True,
        None,
        None,
        Expect(
            jobs={"new": done(started(Job(id="new", labels=()), "v"), "v")},
            vms={"v": spent(bound(vm("v"), "new"))},
        ),
    ),
    (
        "duplicate-completion-other-job-running-now",
        bound(vm("v"), "c"),
        job("a", JobState.COMPLETED, "v", conclusion="success"),
        True,
        None,
        None,
        Expect(),
    ),
    (
        "completion-after-cancel-frees-the-runner",
        vm("v", agent=AgentState.JOB_RUNNING),
        job("a", JobState.CANCELLED, "v"),
        False,
        None,
        None,
        Expect(vms={"v": spent(vm("v", agent=AgentState.JOB_RUNNING))}),
    ),
]


@pytest.mark.parametrize(
    ("the_vm", "the_job", "success", "reserved", "other", "want"),
    [c[1:] for c in JOB_COMPLETED],
    ids=[c[0] for c in JOB_COMPLETED],
)
def test_job_completed(
    the_vm: Vm, the_job: Job, success: bool, reserved: Job | None, other: Vm | None, want: Expect
) -> None:
    change = t.job_completed(
        the_vm, the_job, success=success, reserved=reserved, other_vm=other, run_id="r9", now=NOW
    )
    check(change, want)
    for v in change.vms.values():
        if v.id == the_vm.id:
            assert not v.runner_registered  # ephemeral: one job per registration


# -- runner_crashed ------------------------------------------------------------------------

CRASH = "runner on v crashed: oom"


def wiped(v: Vm) -> Vm:
    return v.with_(job_id="", reserved_job="", cmd_id="", runner_registered=False, last_active=NOW)


# (id, vm, running, reserved, max_retries, expected)
RUNNER_CRASHED: list[tuple[str, Vm, Job | None, Job | None, int, Expect]] = [
    (
        "no-jobs",
        vm("v", cmd_id="c1"),
        None,
        None,
        MAX,
        Expect(vms={"v": wiped(vm("v", cmd_id="c1"))}),
    ),
    (
        "running-job-retried",
        RUNNING_V,
        A_RUNNING,
        None,
        MAX,
        Expect(
            jobs={"a": back(A_RUNNING, CRASH, retries=1)},
            vms={"v": wiped(RUNNING_V)},
            requeued=["a"],
        ),
    ),
    (
        "reserved-job-retried",
        V.with_(cmd_id="c1"),
        None,
        A_ON_V,
        MAX,
        Expect(jobs={"a": back(A_ON_V, CRASH, retries=1)}, vms={"v": wiped(V)}, requeued=["a"]),
    ),
    (
        "bounded-failed-after-max",
        RUNNING_V,
        A_RUNNING.with_(retries=MAX),
        None,
        MAX,
        Expect(
            jobs={"a": gave_up(A_RUNNING.with_(retries=MAX), CRASH)}, vms={"v": wiped(RUNNING_V)}
        ),
    ),
    (
        "terminal-job-untouched",
        RUNNING_V,
        job("a", JobState.COMPLETED, "v"),
        None,
        MAX,
        Expect(vms={"v": wiped(RUNNING_V)}),
    ),
    (
        "job-bound-elsewhere-untouched",
        V,
        None,
        assigned("a", "w"),
        MAX,
        Expect(vms={"v": wiped(V)}),
    ),
]


@pytest.mark.parametrize(
    ("the_vm", "the_running", "reserved", "max_retries", "want"),
    [c[1:] for c in RUNNER_CRASHED],
    ids=[c[0] for c in RUNNER_CRASHED],
)
def test_runner_crashed(
    the_vm: Vm, the_running: Job | None, reserved: Job | None, max_retries: int, want: Expect
) -> None:
    change = t.runner_crashed(
        the_vm, the_running, reserved, now=NOW, max_retries=max_retries, reason="oom"
    )
    check(change, want)


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_runner_crashes_are_bounded(max_retries: int) -> None:
    j = A_RUNNING
    for attempt in range(1, max_retries + 2):
        change = t.runner_crashed(
            RUNNING_V,
            j.with_(vm_id="v", state=JobState.RUNNING),
            None,
            now=NOW,
            max_retries=max_retries,
            reason="x",
        )
        j = change.jobs["a"]
        assert j.retries == attempt
        if attempt <= max_retries:
            assert j.state is JobState.QUEUED and change.requeued == ["a"]
        else:
            assert j.state is JobState.FAILED and change.requeued == []
            assert "gave up" in j.reason


# -- command_acked ---------------------------------------------------------------------------

PENDING = V.with_(cmd_id="c1", runner_registered=False, agent=AgentState.REGISTERING)
DRAINING = vm("v", cmd_id="d1", lifecycle=Lifecycle.DRAINING, reserved_at=EARLIER)
REFUSED = "registration on v failed: bad token"


def unreserved(v: Vm) -> Vm:
    return v.with_(cmd_id="", reserved_job="", reserved_at=0.0, runner_registered=False)


# (id, vm, reserved, command id, success, max_retries, expected)
COMMAND_ACKED: list[tuple[str, Vm, Job | None, str, bool, int, Expect]] = [
    ("stale-id", PENDING, A_ON_V, "c0", True, MAX, Expect(note="ack of c0 on v is stale")),
    ("stale-failure", PENDING, A_ON_V, "c0", False, MAX, Expect(note="is stale")),
    ("no-command-pending", V, A_ON_V, "c1", False, MAX, Expect(note="is stale")),
    ("success", PENDING, A_ON_V, "c1", True, MAX, Expect(vms={"v": PENDING.with_(cmd_id="")})),
    (
        "failure-requeues-counted",
        PENDING,
        A_ON_V,
        "c1",
        False,
        MAX,
        Expect(
            jobs={"a": back(A_ON_V, REFUSED, retries=1)},
            vms={"v": unreserved(PENDING)},
            requeued=["a"],
        ),
    ),
    (
        "failure-bounded",
        PENDING,
        A_ON_V.with_(retries=MAX),
        "c1",
        False,
        MAX,
        Expect(
            jobs={"a": gave_up(A_ON_V.with_(retries=MAX), REFUSED)}, vms={"v": unreserved(PENDING)}
        ),
    ),
    (
        "failure-reservation-moved",
        PENDING,
        assigned("a", "w"),
        "c1",
        False,
        MAX,
        Expect(vms={"v": unreserved(PENDING)}),
    ),
    (
        "failure-no-reservation",
        PENDING.with_(reserved_job=""),
        None,
        "c1",
        False,
        MAX,
        Expect(vms={"v": unreserved(PENDING)}),
    ),
    (
        "drain-refused-asks-again-next-pass",
        DRAINING,
        None,
        "d1",
        False,
        MAX,
        Expect(vms={"v": DRAINING.with_(cmd_id="", lifecycle=Lifecycle.NONE)}),
    ),
    ("drain-acked", DRAINING, None, "d1", True, MAX, Expect(vms={"v": DRAINING.with_(cmd_id="")})),
]


@pytest.mark.parametrize(
    ("the_vm", "reserved", "command_id", "success", "max_retries", "want"),
    [c[1:] for c in COMMAND_ACKED],
    ids=[c[0] for c in COMMAND_ACKED],
)
def test_command_acked(
    the_vm: Vm, reserved: Job | None, command_id: str, success: bool, max_retries: int, want: Expect
) -> None:
    change = t.command_acked(
        the_vm,
        reserved,
        command_id=command_id,
        success=success,
        message="bad token",
        now=NOW,
        max_retries=max_retries,
    )
    check(change, want)


# -- job_ended_elsewhere ---------------------------------------------------------------------


def ended(j: Job, state: JobState, conclusion: str) -> Job:
    return j.with_(state=state, reason="gh", conclusion=conclusion, finished_at=NOW, updated_at=NOW)


# (id, job, vm, state, conclusion, expected)
ENDED: list[tuple[str, Job, Vm | None, JobState, str, Expect]] = [
    (
        "queued-cancelled",
        job("a"),
        None,
        JobState.CANCELLED,
        "cancelled",
        Expect(jobs={"a": ended(job("a"), JobState.CANCELLED, "cancelled")}),
    ),
    (
        "assigned-releases-the-reservation",
        A_ON_V,
        V,
        JobState.CANCELLED,
        "cancelled",
        Expect(
            jobs={"a": ended(A_ON_V, JobState.CANCELLED, "cancelled")},
            vms={"v": V.with_(reserved_job="", reserved_at=0.0)},
            freed=["v"],
        ),
    ),
    (
        "running-unbinds-the-vm",
        A_RUNNING,
        RUNNING_V,
        JobState.COMPLETED,
        "success",
        Expect(
            jobs={"a": ended(A_RUNNING, JobState.COMPLETED, "success")},
            vms={"v": RUNNING_V.with_(job_id="", last_active=NOW)},
        ),
    ),
    (
        "empty-conclusion-keeps-the-job-s",
        A_RUNNING.with_(conclusion="failure"),
        None,
        JobState.COMPLETED,
        "",
        Expect(jobs={"a": ended(A_RUNNING, JobState.COMPLETED, "failure")}),
    ),
    (
        "vm-moved-on-untouched",
        A_ON_V,
        vm("v", reserved_job="z"),
        JobState.CANCELLED,
        "",
        Expect(jobs={"a": ended(A_ON_V, JobState.CANCELLED, "")}),
    ),
    (
        "terminal-no-change",
        job("a", JobState.COMPLETED),
        None,
        JobState.CANCELLED,
        "cancelled",
        Expect(),
    ),
    ("failed-no-change", job("a", JobState.FAILED), V, JobState.COMPLETED, "success", Expect()),
]


@pytest.mark.parametrize(
    ("the_job", "the_vm", "state", "conclusion", "want"),
    [c[1:] for c in ENDED],
    ids=[c[0] for c in ENDED],
)
def test_job_ended_elsewhere(
    the_job: Job, the_vm: Vm | None, state: JobState, conclusion: str, want: Expect
) -> None:
    change = t.job_ended_elsewhere(
        the_job, the_vm, state=state, reason="gh", conclusion=conclusion, now=NOW
    )
    check(change, want)


# -- assignment_timed_out --------------------------------------------------------------------

TIMEOUT = "no runner started it on v in time"

# (id, job, vm, max_retries, expected)
TIMED_OUT: list[tuple[str, Job, Vm | None, int, Expect]] = [
    (
        "requeued-and-vm-released",
        A_ON_V,
        V,
        MAX,
        Expect(
            jobs={"a": back(A_ON_V, TIMEOUT, retries=1)},
            vms={"v": V.with_(reserved_job="", reserved_at=0.0)},
            requeued=["a"],
            freed=["v"],
        ),
    ),
    (
        "bounded",
        A_ON_V.with_(retries=MAX),
        V,
        MAX,
        Expect(
            jobs={"a": gave_up(A_ON_V.with_(retries=MAX), TIMEOUT)},
            vms={"v": V.with_(reserved_job="", reserved_at=0.0)},
            freed=["v"],
        ),
    ),
    (
        "vm-gone",
        A_ON_V,
        None,
        MAX,
        Expect(jobs={"a": back(A_ON_V, TIMEOUT, retries=1)}, requeued=["a"]),
    ),
    (
        "vm-moved-on-untouched",
        A_ON_V,
        vm("v", reserved_job="z"),
        MAX,
        Expect(jobs={"a": back(A_ON_V, TIMEOUT, retries=1)}, requeued=["a"]),
    ),
    (
        "no-vm-id",
        assigned("a", ""),
        None,
        MAX,
        Expect(
            jobs={
                "a": back(assigned("a", ""), "no runner started it on its VM in time", retries=1)
            },
            requeued=["a"],
        ),
    ),
    ("started-meanwhile", A_RUNNING, RUNNING_V, MAX, Expect()),
    ("requeued-meanwhile", job("a"), None, MAX, Expect()),
    ("cancelled-meanwhile", job("a", JobState.CANCELLED, "v"), V, MAX, Expect()),
]


@pytest.mark.parametrize(
    ("the_job", "the_vm", "max_retries", "want"),
    [c[1:] for c in TIMED_OUT],
    ids=[c[0] for c in TIMED_OUT],
)
def test_assignment_timed_out(
    the_job: Job, the_vm: Vm | None, max_retries: int, want: Expect
) -> None:
    check(t.assignment_timed_out(the_job, the_vm, now=NOW, max_retries=max_retries), want)


# -- vm_lost -------------------------------------------------------------------------------

LOST = "VM v was lost"


def lost(v: Vm) -> Vm:
    return v.with_(job_id="", reserved_job="", cmd_id="", runner_registered=False, connected=False)


def parked(j: Job) -> Job:
    return j.with_(
        lost_at=NOW, reason="VM v was lost while running it; GitHub settles it", updated_at=NOW
    )


# (id, vm, running, reserved, expected)
VM_LOST: list[tuple[str, Vm, Job | None, Job | None, Expect]] = [
    ("empty", vm("v"), None, None, Expect(vms={"v": lost(vm("v"))})),
    (
        # GitHub had handed it to the lost runner: it fails there, never runs elsewhere.
        "running-kept-for-github",
        RUNNING_V,
        A_RUNNING,
        None,
        Expect(jobs={"a": parked(A_RUNNING)}, vms={"v": lost(RUNNING_V)}),
    ),
    (
        "running-and-reserved",
        RUNNING_V.with_(reserved_job="b"),
        A_RUNNING,
        assigned("b", "v"),
        Expect(
            jobs={"a": parked(A_RUNNING), "b": back(assigned("b", "v"), LOST, retries=1)},
            vms={"v": lost(RUNNING_V)},
            requeued=["b"],
        ),
    ),
    (
        "reserved-requeued",
        V.with_(cmd_id="c1"),
        None,
        A_ON_V,
        Expect(jobs={"a": back(A_ON_V, LOST, retries=1)}, vms={"v": lost(V)}, requeued=["a"]),
    ),
    (
        "bounded",
        V.with_(cmd_id="c1"),
        None,
        A_ON_V.with_(retries=MAX),
        Expect(jobs={"a": gave_up(A_ON_V.with_(retries=MAX), LOST)}, vms={"v": lost(V)}),
    ),
    (
        "terminal-untouched",
        RUNNING_V,
        job("a", JobState.COMPLETED, "v"),
        None,
        Expect(vms={"v": lost(RUNNING_V)}),
    ),
    ("bound-elsewhere-untouched", V, None, assigned("a", "w"), Expect(vms={"v": lost(V)})),
]


@pytest.mark.parametrize(
    ("the_vm", "the_running", "reserved", "want"),
    [c[1:] for c in VM_LOST],
    ids=[c[0] for c in VM_LOST],
)
def test_vm_lost(the_vm: Vm, the_running: Job | None, reserved: Job | None, want: Expect) -> None:
    check(t.vm_lost(the_vm, the_running, reserved, now=NOW, max_retries=MAX), want)


# -- agent_reported --------------------------------------------------------------------------

BOOTED = Vm(
    id="v",
    labels=LABELS,
    infra=InfraStatus.RUNNING,
    lifecycle=Lifecycle.STARTING,
    last_active=EARLIER,
)

# (id, vm, state, capabilities, expected fields of the result)
AGENT: list[tuple[str, Vm, AgentState, tuple[str, ...] | None, dict[str, Any]]] = [
    (
        "first-ready",
        BOOTED,
        AgentState.READY,
        None,
        {
            "agent": AgentState.READY,
            "connected": True,
            "lifecycle": Lifecycle.NONE,
            "last_active": NOW,
            "runner_registered": False,
        },
    ),
    (
        "ready-unregisters",
        vm("v", agent=AgentState.JOB_RUNNING),
        AgentState.READY,
        None,
        {"agent": AgentState.READY, "runner_registered": False, "last_active": NOW},
    ),
    (
        "idle-registers",
        vm("v", agent=AgentState.REGISTERING, runner_registered=False),
        AgentState.IDLE,
        None,
        {"agent": AgentState.IDLE, "runner_registered": True, "last_active": NOW},
    ),
    (
        "ready-to-idle-keeps-last-active",
        vm("v", agent=AgentState.READY, runner_registered=False),
        AgentState.IDLE,
        None,
        {"agent": AgentState.IDLE, "runner_registered": True, "last_active": EARLIER},
    ),
    (
        "job-running-registers",
        vm("v", runner_registered=False),
        AgentState.JOB_RUNNING,
        None,
        {"agent": AgentState.JOB_RUNNING, "runner_registered": True, "last_active": EARLIER},
    ),
    (
        "registering-leaves-registration-alone",
        vm("v", agent=AgentState.READY, runner_registered=False),
        AgentState.REGISTERING,
        None,
        {"agent": AgentState.REGISTERING, "runner_registered": False},
    ),
    (
        "error-keeps-registration",
        vm("v"),
        AgentState.ERROR,
        None,
        {"agent": AgentState.ERROR, "runner_registered": True, "last_active": EARLIER},
    ),
    (
        "reconnect-marks-connected",
        vm("v", connected=False, agent=AgentState.IDLE),
        AgentState.IDLE,
        None,
        {"connected": True, "last_active": EARLIER},
    ),
    (
        "stopping-lifecycle-kept",
        vm("v", lifecycle=Lifecycle.STOPPING),
        AgentState.SHUTTING_DOWN,
        None,
        {"lifecycle": Lifecycle.STOPPING, "agent": AgentState.SHUTTING_DOWN},
    ),
    (
        "capabilities-set",
        vm("v", capabilities=("old",)),
        AgentState.IDLE,
        ("jit",),
        {"capabilities": ("jit",)},
    ),
    (
        "capabilities-kept",
        vm("v", capabilities=("old",)),
        AgentState.IDLE,
        None,
        {"capabilities": ("old",)},
    ),
]


@pytest.mark.parametrize(
    ("the_vm", "state", "capabilities", "fields"), [c[1:] for c in AGENT], ids=[c[0] for c in AGENT]
)
def test_agent_reported(
    the_vm: Vm, state: AgentState, capabilities: tuple[str, ...] | None, fields: dict[str, Any]
) -> None:
    new = t.agent_reported(the_vm, state, now=NOW, capabilities=capabilities)
    assert {name: getattr(new, name) for name in fields} == fields
    untouched = {"reserved_job", "job_id", "cmd_id", "infra", "labels", "session"}
    assert {n: getattr(new, n) for n in untouched} == {n: getattr(the_vm, n) for n in untouched}


# -- parsing helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("True", True),
        (" 1 ", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("", False),
        ("no", False),
    ],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert t.parse_bool(text) is value


@pytest.mark.parametrize(
    ("data", "pair"),
    [
        ({"job_id": "42", "run_id": "7"}, ("42", "7")),
        ({"job_id": " 42 "}, ("42", "")),
        ({}, ("", "")),
        ({"run_id": "7"}, ("", "7")),
    ],
)
def test_event_job(data: dict[str, str], pair: tuple[str, str]) -> None:
    assert t.event_job(data) == pair


def test_a_lost_running_job_ends_failed_only_once_github_stayed_silent() -> None:
    parked_job = parked(A_RUNNING)
    change = t.lost_job_expired(parked_job, now=NOW + 1800, after=1800)
    ended = change.jobs["a"]
    assert (ended.state, ended.finished_at) == (JobState.FAILED, NOW + 1800)
    assert "GitHub never reported its end" in ended.reason
    assert t.lost_job_expired(A_RUNNING, now=NOW, after=1800).empty  # not lost
    done = parked_job.with_(state=JobState.COMPLETED)
    assert t.lost_job_expired(done, now=NOW, after=1800).empty  # GitHub said meanwhile


def test_requeue_and_start_clear_a_lost_mark() -> None:
    marked = assigned("a", "v").with_(lost_at=EARLIER)
    assert t.requeue(marked, NOW, "x", MAX).lost_at == 0.0
