"""Pool policy plans on hand-built pools, with `now` as an input."""

from __future__ import annotations

import pytest

from migctl.domain.model import AgentState, InfraStatus, Lifecycle, Vm
from migctl.domain.policy import health_plan, idle_plan

NOW = 10_000.0
LABELS = ("self-hosted",)


def vm(vm_id: str, **kw: object) -> Vm:
    base: dict[str, object] = dict(
        labels=LABELS,
        infra=InfraStatus.RUNNING,
        agent=AgentState.READY,
        connected=True,
        last_heartbeat=NOW - 1,
        last_active=NOW - 1,
        state_since=NOW - 100,
    )
    base.update(kw)
    return Vm(id=vm_id, **base)  # type: ignore[arg-type]


def idle(vms: list[Vm], queue: int = 0, min_ready: int = 1):
    return idle_plan(
        vms, NOW, min_ready=min_ready, idle_timeout=600, drain_timeout=900, queue_length=queue
    )


def health(vms: list[Vm]):
    return health_plan(vms, NOW, heartbeat_timeout=60, boot_timeout=600)


@pytest.mark.parametrize(
    ("vms", "queue", "min_ready", "stop", "drain"),
    [
        pytest.param(
            [vm("a", last_active=NOW - 700)],
            0,
            0,
            ("a",),
            (),
            id="idle past timeout, no runner: stop",
        ),
        pytest.param([vm("a", last_active=NOW - 700)], 0, 1, (), (), id="the warm pool is kept"),
        pytest.param([vm("a", last_active=NOW - 500)], 0, 0, (), (), id="not idle long enough"),
        pytest.param(
            [vm("a", last_active=NOW - 700, agent=AgentState.IDLE, runner_registered=True)],
            0,
            0,
            (),
            ("a",),
            id="registered runner: drain first",
        ),
        pytest.param(
            [vm("a", last_active=NOW - 700)], 3, 0, (), (), id="jobs waiting: no scale-down"
        ),
        pytest.param(
            [vm("a", last_active=NOW - 700, job_id="j1", agent=AgentState.JOB_RUNNING)],
            0,
            0,
            (),
            (),
            id="busy VM never stopped",
        ),
        pytest.param(
            [vm("a", last_active=NOW - 700, reserved_job="j1")],
            0,
            0,
            (),
            (),
            id="reserved VM never stopped",
        ),
        pytest.param(
            [vm("old", last_active=NOW - 900), vm("new", last_active=NOW - 800)],
            0,
            1,
            ("old",),
            (),
            id="keeps the most recently active",
        ),
        pytest.param(
            [vm("a", lifecycle=Lifecycle.DRAINING, agent=AgentState.READY)],
            0,
            0,
            ("a",),
            (),
            id="drain acked: stop",
        ),
        pytest.param(
            [vm("a", lifecycle=Lifecycle.DRAINING, cmd_id="c1", state_since=NOW - 10)],
            0,
            0,
            (),
            (),
            id="drain not yet acked: wait",
        ),
        pytest.param(
            [vm("a", lifecycle=Lifecycle.DRAINING, cmd_id="c1", state_since=NOW - 1000)],
            0,
            0,
            (),
            (),
            id="drain never acked: never stopped unacked (back to the pool)",
        ),
        pytest.param(
            [vm("a", lifecycle=Lifecycle.DRAINING, job_id="j1", agent=AgentState.JOB_RUNNING)],
            0,
            0,
            (),
            (),
            id="job started during the drain: it keeps its job",
        ),
    ],
)
def test_idle_plan(vms, queue, min_ready, stop, drain) -> None:
    plan = idle(vms, queue, min_ready)
    assert plan.stop == stop
    assert plan.drain == drain


def test_an_unacked_drain_is_cancelled_after_drain_timeout() -> None:
    silent = vm("a", lifecycle=Lifecycle.DRAINING, cmd_id="c1", state_since=NOW - 1000)
    assert idle([silent]).undrain == ("a",)


def test_a_drain_that_met_a_job_is_cancelled_after_drain_timeout() -> None:
    busy = vm("a", lifecycle=Lifecycle.DRAINING, job_id="j1", state_since=NOW - 1000)
    assert idle([busy]).undrain == ("a",)
    assert idle([busy]).stop == ()


@pytest.mark.parametrize(
    ("v", "unhealthy", "replace"),
    [
        pytest.param(vm("a"), (), (), id="heard recently"),
        pytest.param(vm("a", last_heartbeat=NOW - 61), ("a",), (), id="silent: unhealthy"),
        pytest.param(
            vm("a", last_heartbeat=NOW - 61, unhealthy=True),
            (),
            ("a",),
            id="unhealthy, no job: replaced",
        ),
        pytest.param(
            vm("a", last_heartbeat=NOW - 100, unhealthy=True, job_id="j1"),
            (),
            (),
            id="unhealthy with a job: grace",
        ),
        pytest.param(
            vm("a", last_heartbeat=NOW - 121, unhealthy=True, job_id="j1"),
            (),
            ("a",),
            id="grace over: replaced (it holds a job)",
        ),
        pytest.param(
            vm(
                "a",
                connected=False,
                agent=AgentState.NONE,
                infra=InfraStatus.CREATING,
                last_heartbeat=0,
                state_since=NOW - 601,
            ),
            (),
            ("a",),
            id="stuck creating",
        ),
        pytest.param(
            vm(
                "a", connected=False, agent=AgentState.NONE, last_heartbeat=0, state_since=NOW - 601
            ),
            (),
            ("a",),
            id="running, never connected",
        ),
        pytest.param(
            vm(
                "a",
                connected=False,
                agent=AgentState.NONE,
                infra=InfraStatus.STOPPED,
                last_heartbeat=0,
                state_since=NOW - 5000,
            ),
            (),
            (),
            id="stopped VMs are not stuck",
        ),
        pytest.param(
            vm("a", lifecycle=Lifecycle.STOPPING, last_heartbeat=NOW - 500),
            (),
            (),
            id="stopping: not silent",
        ),
    ],
)
def test_health_plan(v, unhealthy, replace) -> None:
    plan = health([v])
    assert plan.unhealthy == unhealthy
    assert plan.replace == replace


def test_an_unhealthy_vm_heard_again_recovers() -> None:
    assert health([vm("a", unhealthy=True)]).healthy == ("a",)
