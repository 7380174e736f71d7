"""The runner hygiene plan on hand-built runner listings and VM records, `now` an input."""

from __future__ import annotations

import zlib

import pytest

from migctl.domain.hygiene import HygienePlan, hygiene_plan, is_ours, pool_prefix
from migctl.domain.model import AgentState, InfraStatus, Lifecycle, Vm
from migctl.ports import RunnerInfo

NOW = 10_000.0
PREFIX = "pool-a-"
LABELS = ("self-hosted", "linux", "x64")
GRACE = 120.0


def runner(
    name: str,
    status: str = "offline",
    busy: bool = False,
    labels: tuple[str, ...] = LABELS,
    runner_id: int = 0,
) -> RunnerInfo:
    return RunnerInfo(
        id=runner_id or zlib.crc32(name.encode()),
        name=name,
        status=status,
        busy=busy,
        labels=labels,
    )


def vm(vm_id: str, **kw: object) -> Vm:
    base: dict[str, object] = dict(
        labels=LABELS,
        infra=InfraStatus.RUNNING,
        agent=AgentState.IDLE,
        connected=True,
        runner_registered=True,
        last_heartbeat=NOW - 1,
    )
    base.update(kw)
    return Vm(id=vm_id, **base)  # type: ignore[arg-type]


def reserved(vm_id: str, sent_ago: float, **kw: object) -> Vm:
    """A VM reserved for a job whose registration was sent `sent_ago` s ago and acked."""
    fields: dict[str, object] = dict(
        reserved_job="j1", reserved_at=NOW - sent_ago, agent=AgentState.READY
    )
    fields.update(kw)
    return vm(vm_id, **fields)


def plan(runners: list[RunnerInfo], vms: list[Vm], complete: bool = True) -> HygienePlan:
    return hygiene_plan(
        runners,
        vms,
        NOW,
        prefix=PREFIX,
        pool_labels=LABELS,
        grace=GRACE,
        complete=complete,
    )


STOPPED = dict(infra=InfraStatus.STOPPED, connected=False, agent=AgentState.NONE)


@pytest.mark.parametrize(
    ("runners", "vms", "deleted"),
    [
        pytest.param([runner("pool-a-1a2b3c")], [], ["pool-a-1a2b3c"], id="offline, no VM: delete"),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", **STOPPED)],
            ["pool-a-1a2b3c"],
            id="offline, VM stopped: delete",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", infra=InfraStatus.SUSPENDED, connected=False)],
            ["pool-a-1a2b3c"],
            id="offline, VM suspended: delete",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", lifecycle=Lifecycle.DELETING)],
            ["pool-a-1a2b3c"],
            id="offline, VM being deleted: delete",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", infra=InfraStatus.GONE, connected=False)],
            ["pool-a-1a2b3c"],
            id="offline, VM gone from the MIG: delete",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c")],
            [],
            id="offline, VM alive: its own (a blip, a JIT runner not started yet)",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", infra=InfraStatus.CREATING, connected=False)],
            [],
            id="offline, VM booting: kept",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", lifecycle=Lifecycle.STOPPING)],
            [],
            id="offline, VM still stopping: next pass",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c")],
            [vm("pool-a-1a2b3c", unhealthy=True)],
            [],
            id="offline, VM unhealthy but alive: health replaces it, not hygiene",
        ),
        pytest.param([runner("pool-a-1a2b3c", busy=True)], [], [], id="busy, no VM: never deleted"),
        pytest.param(
            [runner("pool-a-1a2b3c", status="online")], [], [], id="online, no VM: a stray, kept"
        ),
        pytest.param([runner("pool-b-1a2b3c")], [], [], id="another pool's name: untouched"),
        pytest.param(
            [runner("pool-a-gpu-1a2b3c")],
            [],
            [],
            id="a pool whose id extends ours (pool-a-gpu): untouched",
        ),
        pytest.param([runner("pool-a-")], [], [], id="the bare prefix: untouched"),
        pytest.param([runner("pool-a-AB12")], [], [], id="not a VM name (upper case): untouched"),
        pytest.param([runner("laptop")], [], [], id="a person's runner: untouched"),
        pytest.param(
            [runner("pool-a-1a2b3c", labels=("self-hosted", "windows"))],
            [],
            [],
            id="our name but not our labels: untouched",
        ),
        pytest.param(
            [runner("pool-a-1a2b3c", labels=("Self-Hosted", "Linux", "X64", "gpu"))],
            [],
            ["pool-a-1a2b3c"],
            id="labels compared as GitHub does (case-insensitive, superset)",
        ),
        pytest.param(
            [
                runner("pool-a-000001"),
                runner("pool-a-000002", busy=True),
                runner("pool-a-000003"),
                runner("pool-a-000004", status="online"),
                runner("other-000005"),
            ],
            [vm("pool-a-000003")],
            ["pool-a-000001"],
            id="a mixed listing",
        ),
    ],
)
def test_which_runners_are_deleted(
    runners: list[RunnerInfo], vms: list[Vm], deleted: list[str]
) -> None:
    got = plan(runners, vms)
    assert [d.name for d in got.delete] == deleted
    by_name = {r.name: r for r in runners}
    for item in got.delete:
        source = by_name[item.name]
        assert item.runner_id == source.id
        assert not source.busy and source.status == "offline"


def test_reasons_and_the_other_lists() -> None:
    got = plan(
        [
            runner("pool-a-000001"),
            runner("pool-a-000002", status="online", busy=True),
            runner("pool-a-000003", status="online"),
            runner("pool-a-000004"),
            runner("other-000005"),
        ],
        [vm("pool-a-000004", **STOPPED)],
    )
    assert [(d.name, d.reason) for d in got.delete] == [
        ("pool-a-000001", "offline, no VM record"),
        ("pool-a-000004", "offline, its VM is STOPPED"),
    ]
    assert got.kept_busy == ("pool-a-000002",)
    assert [(s.name, s.reason) for s in got.strays] == [("pool-a-000003", "online, no VM record")]
    assert got.ours == 4


@pytest.mark.parametrize(
    ("runners", "vms", "flagged"),
    [
        pytest.param([], [reserved("pool-a-1", 200)], ["pool-a-1"], id="acked long ago, no runner"),
        pytest.param(
            [runner("pool-a-1", status="offline")],
            [reserved("pool-a-1", 200)],
            ["pool-a-1"],
            id="listed but never online (a JIT runner never started)",
        ),
        pytest.param(
            [runner("pool-a-1", status="online")], [reserved("pool-a-1", 200)], [], id="online"
        ),
        pytest.param(
            [runner("pool-a-1", status="offline", busy=True)],
            [reserved("pool-a-1", 200)],
            [],
            id="busy counts as appeared",
        ),
        pytest.param([], [reserved("pool-a-1", 60)], [], id="within the grace period"),
        pytest.param(
            [], [reserved("pool-a-1", 200, cmd_id="c1")], [], id="registration not acked yet"
        ),
        pytest.param([], [reserved("pool-a-1", 200, reserved_job="")], [], id="not reserved"),
        pytest.param(
            [], [reserved("pool-a-1", 200, job_id="j2")], [], id="its runner already took a job"
        ),
        pytest.param(
            [], [reserved("pool-a-1", 200, **STOPPED)], [], id="stopped: no runner expected"
        ),
        pytest.param(
            [],
            [reserved("pool-a-1", 200, lifecycle=Lifecycle.STOPPING)],
            [],
            id="stopping: no runner expected",
        ),
        pytest.param(
            [],
            [reserved("pool-a-1", 200, lifecycle=Lifecycle.DRAINING)],
            [],
            id="draining: no runner expected",
        ),
        pytest.param(
            [runner("pool-a-2", status="online")],
            [reserved("pool-a-1", 200), reserved("pool-a-2", 200), vm("pool-a-3")],
            ["pool-a-1"],
            id="per VM, by name",
        ),
        pytest.param(
            [runner("pool-a-1", status="online", labels=("windows",))],
            [reserved("pool-a-1", 200)],
            ["pool-a-1"],
            id="a runner that is not ours does not count",
        ),
    ],
)
def test_which_vms_are_flagged(
    runners: list[RunnerInfo], vms: list[Vm], flagged: list[str]
) -> None:
    got = plan(runners, vms)
    assert [f.vm_id for f in got.never_appeared] == flagged
    assert got.delete == ()  # flags never turn into deletes


def test_flag_carries_the_reservation_and_why() -> None:
    [flag] = plan([], [reserved("pool-a-1", 200)]).never_appeared
    assert (flag.vm_id, flag.reserved_job, flag.reserved_at) == ("pool-a-1", "j1", NOW - 200)
    assert flag.reason == "runner not in GitHub's list 200s after the registration was sent"


def test_an_incomplete_listing_flags_nothing_but_still_deletes() -> None:
    got = plan([runner("pool-a-9")], [reserved("pool-a-1", 200)], complete=False)
    assert got.never_appeared == ()
    assert [d.name for d in got.delete] == ["pool-a-9"]


def test_the_plan_does_not_depend_on_order() -> None:
    runners = [runner(f"pool-a-{i:06d}", runner_id=i + 1) for i in range(6)]
    vms = [vm("pool-a-000002"), reserved("pool-a-000009", 500)]
    forward = plan(runners, vms)
    backward = plan(runners[::-1], vms[::-1])
    assert sorted(forward.delete, key=lambda d: d.runner_id) == sorted(
        backward.delete, key=lambda d: d.runner_id
    )
    assert forward.never_appeared == backward.never_appeared


@pytest.mark.parametrize(
    ("mig", "pool", "prefix"),
    [("", "pool-a", "pool-a-"), ("runners-2vcpu", "pool-a", "runners-2vcpu-")],
)
def test_pool_prefix(mig: str, pool: str, prefix: str) -> None:
    assert pool_prefix(mig, pool) == prefix


def test_is_ours_needs_name_and_labels() -> None:
    assert is_ours(runner("pool-a-abc123"), PREFIX, LABELS)
    assert not is_ours(runner("pool-a-abc123"), PREFIX, (*LABELS, "gpu"))
    assert not is_ours(runner("xpool-a-abc123"), PREFIX, LABELS)
