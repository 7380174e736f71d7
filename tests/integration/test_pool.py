"""The pool reconcilers on a real Redis with the simulated MIG: races, drain-then-stop,
health replacement, and the GCloud sync."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.services.events import AgentEvents
from migctl.services.pool import Pool
from migctl.settings import Settings
from migctl.sim.mig import SimMig, SimTimings
from migctl.worker.dispatch import RecordingDispatcher

pytestmark = pytest.mark.integration

POOL = "pool-t"
LABELS = ("self-hosted", "linux")


Recorder = RecordingDispatcher


class Clock:
    def __init__(self, now: float) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


def settings(**vm_manager: object) -> Settings:
    return Settings(
        pool={"id": POOL, "labels": list(LABELS)},
        vm_manager={
            "provider": "sim",
            "min_ready_vms": 0,
            "idle_timeout": 600,
            "max_vms": 10,
            "max_scale_up_per_minute": 100,
            **vm_manager,
        },
        github_app={"app_id": "1", "private_key": "unused"},
        pubsub={"source": "local"},
    )


@pytest.fixture
def world(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    clock = Clock(time.time())
    store = RedisStore(client, POOL)
    mig = SimMig(client, POOL, SimTimings(), clock=clock.now)
    dispatch = Recorder()

    def pool(**vm_manager: object) -> Pool:
        return Pool(store, mig, settings(**vm_manager), dispatch, clock=clock)

    return store, mig, dispatch, clock, pool


def put(store: RedisStore, *vms: Vm) -> None:
    store.save(Change(vms={vm.id: vm for vm in vms}), {})


def running_vm(vm_id: str, clock: Clock, **kw: object) -> Vm:
    base: dict[str, object] = dict(
        labels=LABELS,
        infra=InfraStatus.RUNNING,
        agent=AgentState.READY,
        connected=True,
        last_heartbeat=clock.t,
        last_active=clock.t,
        state_since=clock.t,
        created_at=clock.t - 1000,
    )
    base.update(kw)
    return Vm(id=vm_id, **base)  # type: ignore[arg-type]


def test_racing_provisioners_never_exceed_max_vms(world) -> None:
    store, mig, _, clock, pool = world
    for i in range(30):
        store.create_job(Job(id=str(i), labels=LABELS, received_at=clock.t + i))
    pools = [pool(max_vms=10) for _ in range(4)]
    errors: list[BaseException] = []

    def run(p: Pool) -> None:
        try:
            for _ in range(5):
                p.provision()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in pools]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(store.get_vms()) == 10
    assert len(mig.list()) == 10


def test_an_idle_registered_runner_is_drained_then_stopped(world) -> None:
    store, mig, dispatch, clock, pool = world
    mig.create(["vm-1"])
    clock.t += 10
    put(
        store,
        running_vm(
            "vm-1", clock, agent=AgentState.IDLE, runner_registered=True, last_active=clock.t - 700
        ),
    )
    p = pool()
    report = p.idle_stop()
    assert report.actions == {"drain": ["vm-1"]}
    [command] = store.pending_commands("vm-1")
    assert command["type"] == "drain"
    assert mig.list()[0].status is InfraStatus.RUNNING  # not stopped under its runner
    events = AgentEvents(store, settings(), dispatch, clock=clock)
    assert events.command_acked("vm-1", command["id"], True, "drained") == "applied"
    report = p.idle_stop()
    assert report.actions == {"stop": ["vm-1"]}
    assert mig.list()[0].status is InfraStatus.STOPPING
    vm, _ = store.get_vm("vm-1")
    assert vm.lifecycle is Lifecycle.STOPPING


def test_a_vm_that_starts_a_job_during_its_drain_keeps_it(world) -> None:
    store, mig, dispatch, clock, pool = world
    mig.create(["vm-1"])
    clock.t += 10
    put(
        store,
        running_vm(
            "vm-1", clock, agent=AgentState.IDLE, runner_registered=True, last_active=clock.t - 700
        ),
    )
    p = pool()
    p.idle_stop()
    store.create_job(Job(id="j1", labels=LABELS, received_at=clock.t))
    events = AgentEvents(store, settings(), dispatch, clock=clock)
    assert events.event("vm-1", "job_started", {"job_id": "j1", "run_id": "1"}) == "applied"
    [command] = store.pending_commands("vm-1")
    events.command_acked(
        "vm-1", command["id"], True, "drained after the job"
    )  # the agent acks late
    assert p.idle_stop().actions.get("stop") is None
    assert mig.list()[0].status is InfraStatus.RUNNING
    assert store.get_job("j1")[0].state is JobState.RUNNING


def test_a_silent_vm_is_replaced_and_its_running_job_left_to_github(world) -> None:
    store, mig, dispatch, clock, pool = world
    mig.create(["vm-1", "vm-2"])
    clock.t += 10
    store.create_job(Job(id="j1", labels=LABELS, received_at=clock.t))
    job = store.get_job("j1")
    put(store, running_vm("vm-1", clock), running_vm("vm-2", clock))
    events = AgentEvents(store, settings(), dispatch, clock=clock)
    events.event("vm-2", "job_started", {"job_id": "j1", "run_id": "1"})
    assert job is not None
    p = pool(heartbeat_timeout=60)
    clock.t += 61
    report = p.sweep()
    assert sorted(report.actions["unhealthy"]) == ["vm-1", "vm-2"]
    clock.t += 1
    report = p.sweep()
    assert report.actions.get("replace") == ["vm-1"]  # no job: at once
    clock.t += 60
    report = p.sweep()
    assert report.actions.get("replace") == ["vm-2"]  # its job after a grace period
    # GitHub had handed j1 to vm-2's runner: it fails it there and will not hand it out
    # again, so it is not queued (a VM would boot for nothing); it waits for GitHub.
    lost = store.get_job("j1")[0]
    assert (lost.state, lost.vm_id, lost.lost_at) == (JobState.RUNNING, "vm-2", clock.t)
    assert ("assign_job", "j1") not in dispatch.calls
    assert store.lost_before(clock.t) == ["j1"]
    statuses = {v.name: v.status for v in mig.list()}
    assert statuses == {"vm-2": InfraStatus.DELETING}  # vm-1's delete finished a minute ago
    # If GitHub never says (its `completed` lost as well), the sweep ends it in the end.
    clock.t += 1801
    report = p.sweep()
    assert report.actions.get("lost_job_expired") == ["j1"]
    ended = store.get_job("j1")[0]
    assert ended.state is JobState.FAILED and "never reported" in ended.reason
    assert store.lost_before(clock.t) == []
    assert store.counters()["failed_jobs"] == 1


def test_sync_discovers_new_vms_and_loses_vanished_ones(world) -> None:
    store, mig, dispatch, clock, pool = world
    mig.create(["vm-1", "vm-2"])
    clock.t += 100
    p = pool()
    report = p.sync()
    assert sorted(report.actions["discovered"]) == ["vm-1", "vm-2"]
    assert {vm.infra for vm, _ in store.get_vms()} == {InfraStatus.RUNNING}
    store.create_job(Job(id="j1", labels=LABELS, received_at=clock.t))
    vm, rev = store.get_vm("vm-1")
    store.save(
        Change(
            vms={"vm-1": vm.with_(connected=True, agent=AgentState.IDLE, created_at=clock.t - 100)}
        ),
        {"vm:vm-1": rev},
    )
    AgentEvents(store, settings(), dispatch, clock=clock).event(
        "vm-1", "job_started", {"job_id": "j1"}
    )
    mig.vanish("vm-1")
    report = p.sync()
    assert report.actions.get("lost") == ["vm-1"]
    assert store.get_vm("vm-1") is None
    # It was running there: GitHub fails it with its runner; it stays bound, marked lost.
    job = store.get_job("j1")[0]
    assert (job.state, job.vm_id, job.lost_at) == (JobState.RUNNING, "vm-1", clock.t)


def test_sync_keeps_the_migs_standby_policy_as_configured(redis_url: str) -> None:

    from migctl.adapters.gce import GceMig
    from migctl.sim.compute_fake import FakeCompute

    fake = FakeCompute("proj", "zone-a", "mig1").start()
    try:
        config = Settings(
            pool={"id": POOL, "labels": list(LABELS)},
            vm_manager={"provider": "gce"},
            gcp={
                "project_id": "proj",
                "zone": "zone-a",
                "mig_name": "mig1",
                "api_endpoint": fake.url,
                "anonymous": True,
                "standby_mode": "SCALE_OUT_POOL",
                "standby_initial_delay": "60s",
            },
            github_app={"app_id": "1", "private_key": "unused"},
            pubsub={"source": "local"},
        )
        store = RedisStore(redis.Redis.from_url(redis_url), POOL)
        pool = Pool(store, GceMig(config.gcp), config, Recorder())
        report = pool.sync()
        assert report.actions["standby_policy"] == ["mode=SCALE_OUT_POOL initial_delay_sec=60"]
        assert fake.standby_policy == {"mode": "SCALE_OUT_POOL", "initialDelaySec": 60}
        assert "standby_policy" not in pool.sync().actions  # held: no second patch
    finally:
        fake.stop()


def test_vm_startup_is_observed_once_when_its_agent_is_first_ready(world) -> None:
    from prometheus_client import generate_latest

    from migctl.metrics import registry

    store, _, dispatch, clock, pool = world
    store.create_job(Job(id="j1", labels=LABELS, received_at=clock.t))
    report = pool(min_ready_vms=0).provision()
    [vm_id] = report.actions["create"]
    clock.t += 42.0
    events = AgentEvents(store, settings(), dispatch, clock=clock)
    events.agent_state(vm_id, AgentState.CONNECTING)
    events.agent_state(vm_id, AgentState.READY)
    events.agent_state(vm_id, AgentState.IDLE)  # not a second startup
    text = generate_latest(registry(store)).decode()
    assert 'controller_vm_startup_seconds_count{pool="pool-t"} 1.0' in text
    assert 'controller_vm_startup_seconds_bucket{le="45.0",pool="pool-t"} 1.0' in text
    assert 'controller_vm_startup_seconds_bucket{le="30.0",pool="pool-t"} 0.0' in text


def test_the_sync_folds_a_listing_into_a_record_that_changed_under_it(world) -> None:
    """An event lands between the sync's read and its write: the status still lands."""
    store, mig, _dispatch, clock, pool = world
    mig.create(["vm-1"])
    p = pool()
    p.sync()
    assert store.get_vm("vm-1")[0].infra is InfraStatus.CREATING
    clock.t += 100  # the MIG says RUNNING now
    real_get_vms = store.get_vms

    def get_vms_then_an_event(*args, **kwargs):
        listed = real_get_vms(*args, **kwargs)
        vm, rev = store.get_vm("vm-1")
        store.save(Change(vms={"vm-1": vm.with_(agent=AgentState.READY)}), {"vm:vm-1": rev})
        return listed

    store.get_vms = get_vms_then_an_event  # type: ignore[method-assign]
    try:
        report = p.sync()
    finally:
        store.get_vms = real_get_vms  # type: ignore[method-assign]
    assert report.actions.get("updated") == ["vm-1"]
    vm = store.get_vm("vm-1")[0]
    assert (vm.infra, vm.agent) == (InfraStatus.RUNNING, AgentState.READY)
