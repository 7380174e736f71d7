"""The simulated MIG against a real Redis (DB 12): lifecycle, GCE rules, idempotence, faults."""

from __future__ import annotations

import os
import threading

import pytest
import redis

from migctl.domain.errors import (
    CapacityExhausted,
    NotFound,
    PermanentError,
    RateLimited,
    TemporaryError,
)
from migctl.domain.model import InfraStatus
from migctl.sim.mig import SimMig, SimTimings

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/12"
T = SimTimings(create_s=3, start_s=2, resume_s=1, stop_s=1, suspend_s=1, delete_s=1)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def r() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("no Redis at 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mig(r: redis.Redis, clock: Clock) -> SimMig:
    return SimMig(r, "pool-a", T, clock)


def statuses(mig: SimMig) -> dict[str, InfraStatus]:
    return {vm.name: vm.status for vm in mig.list()}


def test_create_then_running(mig: SimMig, clock: Clock) -> None:
    mig.create(["vm-1", "vm-2"])
    assert statuses(mig) == {"vm-1": InfraStatus.CREATING, "vm-2": InfraStatus.CREATING}
    clock.advance(2.9)
    assert statuses(mig)["vm-1"] == InfraStatus.CREATING
    clock.advance(0.1)
    vms = mig.list()
    assert [vm.status for vm in vms] == [InfraStatus.RUNNING, InfraStatus.RUNNING]
    assert vms[0].created_at == 1_000.0
    assert vms[0].detail == "RUNNING"


def test_full_lifecycle(mig: SimMig, clock: Clock) -> None:
    mig.create(["vm"])
    clock.advance(T.create_s)
    seen = []
    for action, duration in [
        (mig.stop, T.stop_s),
        (mig.start, T.start_s),
        (mig.suspend, T.suspend_s),
        (mig.resume, T.resume_s),
    ]:
        action(["vm"])
        seen.append(statuses(mig)["vm"])
        clock.advance(duration)
        seen.append(statuses(mig)["vm"])
    assert seen == [
        InfraStatus.STOPPING,
        InfraStatus.STOPPED,
        InfraStatus.STARTING,
        InfraStatus.RUNNING,
        InfraStatus.SUSPENDING,
        InfraStatus.SUSPENDED,
        InfraStatus.STARTING,
        InfraStatus.RUNNING,
    ]
    mig.delete(["vm"])
    assert statuses(mig) == {"vm": InfraStatus.DELETING}
    clock.advance(T.delete_s)
    assert mig.list() == []
    mig.create(["vm"])  # the name is free again
    assert statuses(mig) == {"vm": InfraStatus.CREATING}


def test_the_key_is_a_cluster_hash_tag(mig: SimMig, r: redis.Redis) -> None:
    mig.create(["vm"])
    assert r.hkeys("migctl:{pool-a}:sim:mig") == [b"vm"]


@pytest.mark.parametrize(
    ("setup", "action", "status"),
    [
        ([], "start", InfraStatus.RUNNING),  # already there
        ([], "resume", InfraStatus.RUNNING),  # a resume retried after it completed
        ([], "create", InfraStatus.RUNNING),
        (["stop"], "stop", InfraStatus.STOPPING),
        (["stop", 1], "stop", InfraStatus.STOPPED),
        (["suspend"], "suspend", InfraStatus.SUSPENDING),
        (["stop", 1, "start"], "start", InfraStatus.STARTING),
        (["suspend", 1, "resume"], "resume", InfraStatus.STARTING),
        (["delete"], "delete", InfraStatus.DELETING),
    ],
)
def test_repeating_an_action_is_a_no_op(
    mig: SimMig, clock: Clock, setup: list, action: str, status: InfraStatus
) -> None:
    mig.create(["vm"])
    clock.advance(T.create_s)
    for step in setup:
        if isinstance(step, int):
            clock.advance(step)
        else:
            getattr(mig, step)(["vm"])
    before = mig.list()
    getattr(mig, action)(["vm"])
    assert mig.list() == before
    assert before[0].status == status


def test_create_is_idempotent(mig: SimMig, clock: Clock) -> None:
    mig.create(["vm"])
    clock.advance(1)
    mig.create(["vm"])  # must not restart the creation clock
    clock.advance(2)
    assert statuses(mig) == {"vm": InfraStatus.RUNNING}
    assert mig.list()[0].created_at == 1_000.0


@pytest.mark.parametrize(
    ("setup", "action"),
    [
        (["stop", 1], "resume"),  # STOPPED (RUNNING is a no-op: a retried resume)
        (["stop", 1], "suspend"),
        (["suspend", 1], "start"),  # SUSPENDED
        (["suspend", 1], "stop"),
        (["stop"], "start"),  # STOPPING
        (["delete"], "stop"),  # DELETING
    ],
)
def test_gce_rules_refuse_with_a_permanent_error(
    mig: SimMig, clock: Clock, setup: list, action: str
) -> None:
    mig.create(["vm"])
    clock.advance(T.create_s)
    for step in setup:
        if isinstance(step, int):
            clock.advance(step)
        else:
            getattr(mig, step)(["vm"])
    status = statuses(mig)["vm"]
    with pytest.raises(PermanentError) as info:
        getattr(mig, action)(["vm"])
    assert "vm" in str(info.value)
    assert status.value in str(info.value)
    assert statuses(mig)["vm"] == status


def test_a_refused_batch_changes_nothing(mig: SimMig, clock: Clock) -> None:
    mig.create(["a", "b"])
    clock.advance(T.create_s)
    mig.stop(["b"])
    with pytest.raises(PermanentError, match="b"):
        mig.suspend(["a", "b"])
    assert statuses(mig) == {"a": InfraStatus.RUNNING, "b": InfraStatus.STOPPING}


@pytest.mark.parametrize("action", ["start", "stop", "suspend", "resume", "delete"])
def test_unknown_names_raise_not_found(mig: SimMig, action: str) -> None:
    with pytest.raises(NotFound):
        getattr(mig, action)(["ghost"])


def test_unknown_names_beside_known_ones_are_skipped(mig: SimMig, clock: Clock) -> None:
    mig.create(["vm"])
    clock.advance(T.create_s)
    mig.stop(["vm", "ghost"])
    assert statuses(mig) == {"vm": InfraStatus.STOPPING}


def test_fail_next_raises_the_given_error_n_times(mig: SimMig, clock: Clock) -> None:
    mig.fail_next(2, RateLimited("slow down", delay=7))
    for _ in range(2):
        with pytest.raises(RateLimited, match="slow down") as info:
            mig.create(["vm"])
        assert info.value.delay == 7
    assert mig.list() == []
    mig.create(["vm"])
    assert statuses(mig) == {"vm": InfraStatus.CREATING}


def test_fail_next_with_a_class_and_a_permanent_error(mig: SimMig) -> None:
    mig.fail_next(1, PermanentError)
    with pytest.raises(PermanentError):
        mig.create(["vm"])
    mig.fail_next(1, TemporaryError("blip", delay=1))
    with pytest.raises(TemporaryError):
        mig.delete(["vm"])  # consumed before the name check: GCE failed the whole call


def test_capacity_exhausted_until(mig: SimMig, clock: Clock) -> None:
    mig.create(["up"])
    clock.advance(T.create_s)
    mig.stop(["up"])
    clock.advance(T.stop_s)
    mig.capacity_exhausted_until(clock.now + 60)
    with pytest.raises(CapacityExhausted):
        mig.create(["new"])
    with pytest.raises(CapacityExhausted):
        mig.start(["up"])
    mig.create(["up"])  # nothing to create: no capacity needed
    clock.advance(60)
    mig.create(["new"])
    mig.start(["up"])
    assert statuses(mig) == {"new": InfraStatus.CREATING, "up": InfraStatus.STARTING}


def test_vanish(mig: SimMig, clock: Clock) -> None:
    mig.create(["vm", "other"])
    clock.advance(T.create_s)
    mig.vanish("vm")
    assert statuses(mig) == {"other": InfraStatus.RUNNING}
    with pytest.raises(NotFound):
        mig.stop(["vm"])


def test_two_instances_share_one_mig(r: redis.Redis, clock: Clock) -> None:
    one = SimMig(r, "pool-a", T, clock)
    # Another process with other timings: it sees what `one` scheduled, as `one` timed it.
    two = SimMig(redis.Redis.from_url(REDIS_URL), "pool-a", SimTimings(create_s=100), clock)
    one.create(["vm"])
    clock.advance(T.create_s)
    assert statuses(two) == {"vm": InfraStatus.RUNNING}
    two.fail_next(1, TemporaryError("from two"))
    with pytest.raises(TemporaryError, match="from two"):
        one.stop(["vm"])
    other_pool = SimMig(r, "pool-b", T, clock)
    assert other_pool.list() == []


def test_concurrent_mutations_are_atomic(r: redis.Redis, clock: Clock) -> None:
    names = [f"vm-{i}" for i in range(20)]
    SimMig(r, "pool-a", T, clock).create(names)
    clock.advance(T.create_s)
    results: list[str] = []
    lock = threading.Lock()

    def stop_or_suspend(action: str) -> None:
        mig = SimMig(redis.Redis.from_url(REDIS_URL), "pool-a", T, clock)
        for name in names:
            try:
                getattr(mig, action)([name])
                outcome = "ok"
            except PermanentError:
                outcome = "refused"
            with lock:
                results.append(f"{action}:{name}:{outcome}")

    threads = [threading.Thread(target=stop_or_suspend, args=(a,)) for a in ("stop", "suspend")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = statuses(SimMig(r, "pool-a", T, clock))
    for name in names:
        # Exactly one of the two won each VM; the loser was refused, never both applied.
        oks = [x for x in results if x.endswith(f":{name}:ok")]
        assert len(oks) == 1
        won = oks[0].split(":")[0]
        assert final[name] == (InfraStatus.STOPPING if won == "stop" else InfraStatus.SUSPENDING)


def test_redis_down_is_a_temporary_error(clock: Clock) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(TemporaryError):
        SimMig(dead, "pool-a", T, clock).list()


def test_fail_rate_fails_that_share_of_calls(mig: SimMig) -> None:
    mig.create(["vm-1"])
    mig.fail_rate(1.0)
    with pytest.raises(TemporaryError, match="fail_rate"):
        mig.list()
    with pytest.raises(TemporaryError, match="fail_rate"):
        mig.stop(["vm-1"])
    mig.fail_rate(0.3)
    failed = 0
    for _ in range(400):
        try:
            mig.list()
        except TemporaryError:
            failed += 1
    assert 60 <= failed <= 180, failed  # 120 expected; far outside means no randomness
    mig.fail_rate(0)
    assert [vm.name for vm in mig.list()] == ["vm-1"]
