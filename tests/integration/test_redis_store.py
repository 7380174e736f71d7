"""The Redis store against a real Redis (DB 15 only): atomic claims under races, the CAS
write path, derived indexes, the command outbox, heartbeats, locks and counters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from migctl.adapters.redis_store import Conflict, RedisStore, StateEpoch
from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm
from migctl.domain.states import is_free
from migctl.domain.transitions import Change

pytestmark = pytest.mark.integration

POOL = "store-test"
NOW = 1_700_000_000.0


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def store(r: redis.Redis) -> RedisStore:
    return RedisStore(r, POOL)


Worker = Callable[[], RedisStore]


@pytest.fixture
def other_worker(r: redis.Redis, redis_url: str) -> Iterator[Worker]:
    """Stores on their own connections, as other Celery worker processes would have."""
    clients: list[redis.Redis] = []

    def make() -> RedisStore:
        clients.append(redis.Redis.from_url(redis_url, socket_timeout=10))
        return RedisStore(clients[-1], POOL)

    yield make
    for client in clients:
        client.close()


def job(job_id: str, state: JobState = JobState.QUEUED, **fields: Any) -> Job:
    fields.setdefault("received_at", NOW)
    return Job(id=job_id, labels=("self-hosted", "linux"), state=state, **fields)


def ready_vm(vm_id: str, **fields: Any) -> Vm:
    base: dict[str, Any] = {
        "labels": ("self-hosted", "linux", "x64"),
        "infra": InfraStatus.RUNNING,
        "connected": True,
        "agent": AgentState.READY,
        "last_active": NOW,
    }
    return Vm(id=vm_id, **{**base, **fields})


def put_vms(store: RedisStore, *vms: Vm) -> None:
    store.save(Change(vms={vm.id: vm for vm in vms}), {})


def claimed(store: RedisStore, result: tuple[tuple[Vm, int] | None, str]) -> str | None:
    """The claimed VM's id; the record the claim returns is the one stored after it."""
    got, why = result
    if got is None:
        assert why in ("job", "limit", "none")
        return None
    assert why == ""
    vm, rev = got
    assert store.get_vm(vm.id) == (vm, rev)
    return vm.id


def members(r: redis.Redis, key: str) -> set[str]:
    kind = r.type(key).decode()
    raw = r.zrange(key, 0, -1) if kind == "zset" else r.smembers(key) if kind == "set" else []
    return {m.decode() for m in raw}


def race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` on n threads released together; return results in index order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = work(i)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    return results


# -- jobs --------------------------------------------------------------------------------


def test_create_job_is_idempotent(store: RedisStore, r: redis.Redis) -> None:
    first = job("1", priority=0)
    assert store.create_job(first) is True
    assert store.create_job(first.with_(labels=("other",), priority=9)) is False
    assert store.create_job(first) is False
    got = store.get_job("1")
    assert got == (first, 1)
    assert members(r, store.k.queue) == {"1"}
    assert store.counters() == {"jobs_received": 1}


def test_create_job_not_queued_stays_out_of_the_queue(store: RedisStore, r: redis.Redis) -> None:
    assert store.create_job(job("c", JobState.CANCELLED)) is True
    assert store.queue_length() == 0
    assert store.queued() == []
    assert store.get_job("c") == (job("c", JobState.CANCELLED), 1)


def test_create_job_races_one_winner(store: RedisStore, other_worker: Worker) -> None:
    stores = [other_worker() for _ in range(8)]
    results = race(8, lambda i: stores[i].create_job(job("dup")))
    assert sorted(results) == [False] * 7 + [True]
    assert store.counters()["jobs_received"] == 1
    assert store.queue_length() == 1


def test_queue_order_priority_then_arrival(store: RedisStore) -> None:
    store.create_job(job("late", received_at=NOW + 5))
    store.create_job(job("early", received_at=NOW + 1))
    store.create_job(job("urgent", received_at=NOW + 9, priority=2))
    assert [j.id for j, _ in store.queued()] == ["urgent", "early", "late"]
    assert [j.id for j, _ in store.queued(limit=1)] == ["urgent"]


def test_records_round_trip(store: RedisStore) -> None:
    full_job = Job(
        id="rt",
        labels=("self-hosted", "Linux"),
        state=JobState.ASSIGNED,
        pool_id=POOL,
        org="acme",
        repo="acme/app",
        run_id="99",
        installation_id=12,
        priority=3,
        received_at=NOW + 0.125,
        vm_id="v1",
        retries=2,
        reason="why: because",
        updated_at=NOW + 1,
        assigned_at=NOW + 2,
        conclusion="",
    )
    full_vm = Vm(
        id="v1",
        labels=("self-hosted", "linux"),
        infra=InfraStatus.SUSPENDED,
        agent=AgentState.REGISTERING,
        lifecycle=Lifecycle.DRAINING,
        connected=True,
        runner_registered=True,
        reserved_job="rt",
        job_id="",
        unhealthy=True,
        created_at=NOW - 10,
        state_since=NOW - 5,
        last_heartbeat=NOW - 1,
        last_active=NOW - 2,
        capabilities=("jit", "x"),
        cmd_id="c1",
        reserved_at=NOW + 2,
        session="s-1",
    )
    store.save(Change(jobs={"rt": full_job}, vms={"v1": full_vm}), {})
    assert store.get_job("rt") == (full_job, 1)
    assert store.get_vm("v1") == (full_vm, 1)
    assert store.get_job("nope") is None
    assert store.get_vm("nope") is None


# -- claim -------------------------------------------------------------------------------------


def snapshot_free(store: RedisStore) -> list[tuple[Vm, int]]:
    return [(vm, rev) for vm, rev in store.get_vms() if is_free(vm)]


def test_claim_reserves_atomically(store: RedisStore, r: redis.Redis) -> None:
    store.create_job(job("j"))
    put_vms(store, ready_vm("v"))
    (vm, rev) = store.get_vm("v") or pytest.fail("no vm")
    assert claimed(store, store.claim("j", 1, [(vm, rev)], now=NOW + 1, max_inflight=10)) == "v"
    j, jrev = store.get_job("j") or pytest.fail("no job")
    v, vrev = store.get_vm("v") or pytest.fail("no vm")
    assert (j.state, j.vm_id, j.assigned_at, jrev) == (JobState.ASSIGNED, "v", NOW + 1, 2)
    assert (v.reserved_job, v.reserved_at, vrev) == ("j", NOW + 1, rev + 1)
    assert members(r, store.k.queue) == set()
    assert members(r, store.k.assigned) == {"j"}
    assert members(r, store.k.free) == set()
    assert store.counters()["assigned_jobs"] == 1


def test_two_claimers_one_vm_exactly_one_wins(store: RedisStore, other_worker: Worker) -> None:
    a, b = other_worker(), other_worker()
    for n in range(25):  # rounds, to let the two threads interleave differently
        ids = (f"a{n}", f"b{n}")
        for job_id in ids:
            store.create_job(job(job_id))
        put_vms(store, ready_vm(f"v{n}"))
        cand = store.get_vm(f"v{n}") or pytest.fail("no vm")
        revs = {job_id: (store.get_job(job_id) or pytest.fail("no job"))[1] for job_id in ids}
        results = race(
            2,
            lambda i, ids=ids, revs=revs, cand=cand: (a, b)[i].claim(
                ids[i], revs[ids[i]], [cand], now=NOW, max_inflight=10
            ),
        )
        winners = [ids[i] for i, result in enumerate(results) if claimed(store, result)]
        assert len(winners) == 1, results
        assert sorted(why for _, why in results) == ["", "none"]
        vm, _ = store.get_vm(f"v{n}") or pytest.fail("no vm")
        assert vm.reserved_job == winners[0]
        loser = ids[1 - ids.index(winners[0])]
        assert (store.get_job(loser) or pytest.fail("no job"))[0].state is JobState.QUEUED


@pytest.mark.parametrize(("n_jobs", "n_vms"), [(12, 5), (4, 9), (8, 8)])
def test_n_jobs_m_vms_race_no_vm_double_claimed(
    store: RedisStore, r: redis.Redis, n_jobs: int, n_vms: int, other_worker: Worker
) -> None:
    for i in range(n_jobs):
        store.create_job(job(f"j{i}", received_at=NOW + i))
    put_vms(store, *(ready_vm(f"v{i}", last_active=NOW + i) for i in range(n_vms)))
    free = snapshot_free(store)
    workers = [other_worker() for _ in range(n_jobs)]

    def claim(i: int) -> tuple[tuple[Vm, int] | None, str]:
        # Each worker read the same free list, and tries it in its own order.
        mine = free[i % n_vms :] + free[: i % n_vms]
        return workers[i].claim(f"j{i}", 1, mine, now=NOW, max_inflight=100)

    results = race(n_jobs, claim)
    won = {f"j{i}": vm_id for i, result in enumerate(results) if (vm_id := claimed(store, result))}
    assert len(won) == min(n_jobs, n_vms)
    assert len(set(won.values())) == len(won), "a VM was claimed twice"
    for i, (got, why) in enumerate(results):
        if got is None:
            assert why == "none"
            assert (store.get_job(f"j{i}") or pytest.fail("no job"))[0].state is JobState.QUEUED
    for job_id, vm_id in won.items():
        j, _ = store.get_job(job_id) or pytest.fail("no job")
        v, _ = store.get_vm(vm_id) or pytest.fail("no vm")
        assert (j.state, j.vm_id, v.reserved_job) == (JobState.ASSIGNED, vm_id, job_id)
    reserved = [vm.reserved_job for vm, _ in store.get_vms() if vm.reserved_job]
    assert sorted(reserved) == sorted(won)
    assert members(r, store.k.free) == {vm.id for vm, _ in store.get_vms() if is_free(vm)}
    assert store.counters()["assigned_jobs"] == len(won)


def test_claim_refuses_a_stale_or_moved_job(store: RedisStore) -> None:
    store.create_job(job("j"))
    put_vms(store, ready_vm("v"))
    cand = store.get_vm("v") or pytest.fail("no vm")
    assert store.claim("j", 7, [cand], now=NOW, max_inflight=10) == (None, "job")
    store.save(Change(jobs={"j": job("j", JobState.CANCELLED)}), {"job:j": 1})
    assert store.claim("j", 2, [cand], now=NOW, max_inflight=10) == (None, "job")
    assert store.claim("missing", 0, [cand], now=NOW, max_inflight=10) == (None, "job")
    assert (store.get_vm("v") or pytest.fail("no vm"))[0].reserved_job == ""


def test_claim_skips_changed_or_taken_candidates(store: RedisStore) -> None:
    store.create_job(job("j"))
    put_vms(store, ready_vm("stale"), ready_vm("taken", job_id="x"), ready_vm("ok"))
    stale = store.get_vm("stale") or pytest.fail("no vm")
    store.save(Change(vms={"stale": stale[0].with_(last_active=NOW + 1)}), {"vm:stale": stale[1]})
    taken = store.get_vm("taken") or pytest.fail("no vm")
    ok = store.get_vm("ok") or pytest.fail("no vm")
    assert store.claim("j", 1, [stale, taken], now=NOW, max_inflight=10) == (None, "none")
    assert claimed(store, store.claim("j", 1, [stale, taken, ok], now=NOW, max_inflight=10)) == "ok"


def test_claim_respects_max_inflight_for_registrations(store: RedisStore, r: redis.Redis) -> None:
    store.create_job(job("j"))
    put_vms(
        store,
        ready_vm("sending", reserved_job="other", cmd_id="c1", reserved_at=NOW),
        ready_vm("fresh"),
        ready_vm("registered", agent=AgentState.IDLE, runner_registered=True),
    )
    assert members(r, store.k.inflight) == {"sending"}
    fresh = store.get_vm("fresh") or pytest.fail("no vm")
    registered = store.get_vm("registered") or pytest.fail("no vm")
    # One registration in flight: a VM that needs one is refused at 1 ...
    assert store.claim("j", 1, [fresh], now=NOW, max_inflight=1) == (None, "limit")
    assert store.get_job("j") == (job("j"), 1)
    # ... while a runner that is already registered needs no registration.
    got = store.claim("j", 1, [fresh, registered], now=NOW, max_inflight=1)
    assert claimed(store, got) == "registered"
    store.create_job(job("k"))
    assert claimed(store, store.claim("k", 1, [fresh], now=NOW, max_inflight=2)) == "fresh"


def test_snapshot_reads_job_inflight_and_best_free_vms(store: RedisStore) -> None:
    store.create_job(job("j"))
    put_vms(
        store,
        ready_vm("old", last_active=NOW - 50),
        ready_vm("new", last_active=NOW + 50),
        ready_vm("mid", last_active=NOW),
        ready_vm("busy", job_id="x"),
        ready_vm("sending", reserved_job="y", cmd_id="c1"),
    )
    snap = store.snapshot("j", candidates=2)
    assert (snap.job, snap.job_rev, snap.inflight) == (job("j"), 1, 1)
    assert [vm.id for vm, _ in snap.free] == ["new", "mid"]
    assert store.snapshot("nope").job is None


# -- the CAS write path --------------------------------------------------------------------


def test_save_conflicts_on_a_stale_rev_and_writes_nothing(
    store: RedisStore, r: redis.Redis
) -> None:
    store.create_job(job("j"))
    put_vms(store, ready_vm("v"))
    j, jrev = store.get_job("j") or pytest.fail("no job")
    v, vrev = store.get_vm("v") or pytest.fail("no vm")
    store.save(Change(vms={"v": v.with_(last_active=NOW + 1)}), {"vm:v": vrev})
    stale = Change(
        jobs={"j": j.with_(state=JobState.CANCELLED)},
        vms={"v": v.with_(reserved_job="j")},
    )
    with pytest.raises(Conflict) as info:
        store.save(stale, {"job:j": jrev, "vm:v": vrev}, counters={"cancelled_jobs": 1})
    assert info.value.key == store.k.vm("v")
    assert info.value.delay == 0.0
    assert store.get_job("j") == (j, jrev)  # the job's part was not written either
    assert (store.get_vm("v") or pytest.fail("no vm"))[0].reserved_job == ""
    assert members(r, store.k.queue) == {"j"}
    assert "cancelled_jobs" not in store.counters()


def test_save_rev_zero_means_must_not_exist(store: RedisStore) -> None:
    put_vms(store, ready_vm("v"))
    with pytest.raises(Conflict):
        store.save(Change(vms={"v": ready_vm("v", last_active=1.0)}), {})
    with pytest.raises(Conflict):
        store.save(Change(jobs={"j": job("j")}), {"job:j": 3})


def test_save_bumps_revs(store: RedisStore) -> None:
    put_vms(store, ready_vm("v"))
    for expected in (2, 3, 4):
        v, rev = store.get_vm("v") or pytest.fail("no vm")
        store.save(Change(vms={"v": v.with_(last_active=v.last_active + 1)}), {"vm:v": rev})
        assert (store.get_vm("v") or pytest.fail("no vm"))[1] == expected


def test_save_many_compares_each_change_on_its_own(store: RedisStore, r: redis.Redis) -> None:
    put_vms(store, ready_vm("a"), ready_vm("b"), ready_vm("c"))
    (a, arev), (b, brev), (c, crev) = store.get_vms()
    store.save(Change(vms={"b": b.with_(last_active=NOW + 1)}), {"vm:b": brev})  # b moved on
    written = store.save_many(
        [
            (Change(vms={"a": a.with_(unhealthy=True)}), {"vm:a": arev}),
            (Change(vms={"b": b.with_(unhealthy=True)}), {"vm:b": brev}),
            (Change(vms={"c": c.with_(lifecycle=Lifecycle.STOPPING)}), {"vm:c": crev}),
            (Change(vms={"d": ready_vm("d")}), {}),
        ]
    )
    assert written == [True, False, True, True]
    got = {vm.id: vm for vm, _ in store.get_vms()}
    assert (got["a"].unhealthy, got["b"].unhealthy) == (True, False)
    assert members(r, store.k.free) == {vm.id for vm in got.values() if is_free(vm)} == {"b", "d"}
    assert store.save_many([]) == []


def test_concurrent_saves_one_wins(store: RedisStore, other_worker: Worker) -> None:
    put_vms(store, ready_vm("v"))
    v, rev = store.get_vm("v") or pytest.fail("no vm")
    workers = [other_worker() for _ in range(6)]

    def write(i: int) -> bool:
        try:
            workers[i].save(Change(vms={"v": v.with_(reserved_job=f"j{i}")}), {"vm:v": rev})
            return True
        except Conflict:
            return False

    assert sorted(race(6, write)) == [False] * 5 + [True]
    assert (store.get_vm("v") or pytest.fail("no vm"))[1] == rev + 1


JOB_INDEXES = [
    (JobState.QUEUED, {"queue"}),
    (JobState.ASSIGNED, {"assigned"}),
    (JobState.RUNNING, set()),
    (JobState.COMPLETED, {"recent"}),
    (JobState.FAILED, {"recent"}),
    (JobState.CANCELLED, {"recent"}),
]


@pytest.mark.parametrize(("state", "indexes"), JOB_INDEXES, ids=[s for s, _ in JOB_INDEXES])
def test_job_indexes_follow_the_state(
    store: RedisStore, r: redis.Redis, state: JobState, indexes: set[str]
) -> None:
    store.create_job(job("j"))
    j, rev = store.get_job("j") or pytest.fail("no job")
    store.save(
        Change(jobs={"j": j.with_(state=state, finished_at=NOW if state.terminal else 0.0)}),
        {"job:j": rev},
    )
    where = {
        name
        for name in ("queue", "assigned", "recent")
        if "j" in members(r, getattr(store.k, name))
    }
    assert where == indexes
    ttl = r.ttl(store.k.job("j"))
    assert (ttl > 0) is state.terminal
    if state is JobState.QUEUED:
        assert [x.id for x, _ in store.queued()] == ["j"]
    if state is JobState.ASSIGNED:
        assert store.assigned_before(NOW + 1) == ["j"]
    if state.terminal:
        assert [x.id for x in store.recent_jobs()] == ["j"]
    assert "j" in store.all_job_ids()


VM_CASES: list[tuple[str, Vm]] = [
    ("ready", ready_vm("v")),
    ("idle", ready_vm("v", agent=AgentState.IDLE, runner_registered=True)),
    ("reserved", ready_vm("v", reserved_job="j")),
    ("registration-pending", ready_vm("v", reserved_job="j", cmd_id="c", reserved_at=NOW)),
    ("pending-unreserved", ready_vm("v", cmd_id="c", reserved_at=NOW)),
    ("busy", ready_vm("v", agent=AgentState.JOB_RUNNING, job_id="j")),
    ("stopped", Vm(id="v", infra=InfraStatus.STOPPED)),
    ("booting", Vm(id="v", infra=InfraStatus.RUNNING)),
    ("unhealthy", ready_vm("v", unhealthy=True)),
]


@pytest.mark.parametrize("vm", [c[1] for c in VM_CASES], ids=[c[0] for c in VM_CASES])
def test_vm_indexes_follow_the_record(store: RedisStore, r: redis.Redis, vm: Vm) -> None:
    # Start from the opposite membership, so the write has to fix each index.
    start = ready_vm("v", cmd_id="" if vm.cmd_id else "c0")
    put_vms(store, start)
    _, rev = store.get_vm("v") or pytest.fail("no vm")
    store.save(Change(vms={"v": vm}), {"vm:v": rev})
    assert ("v" in members(r, store.k.free)) is is_free(vm)
    assert ("v" in members(r, store.k.inflight)) is bool(vm.cmd_id)
    assert members(r, store.k.vms) == {"v"}


def test_deleting_a_vm_drops_it_everywhere(store: RedisStore, r: redis.Redis) -> None:
    put_vms(store, ready_vm("v"), ready_vm("w", cmd_id="c", reserved_job="j"))
    store.save(Change(), {}, commands=[("v", {"id": "c1", "type": "register_runner"}, 60)])
    revs = {f"vm:{vm.id}": rev for vm, rev in store.get_vms()}
    store.save(Change(), revs, deleted_vms=["v", "w"])
    assert store.get_vms() == []
    for key in (store.k.vms, store.k.free, store.k.inflight):
        assert members(r, key) == set()
    assert not r.exists(store.k.outbox("v"), store.k.cmds("v"), store.k.vm("v"), store.k.vm("w"))
    put_vms(store, ready_vm("x"))
    with pytest.raises(Conflict):  # deleting what changed meanwhile is refused
        store.save(Change(), {"vm:x": 9}, deleted_vms=["x"])
    assert store.get_vm("x") is not None


# -- the command outbox --------------------------------------------------------------------


def command(cmd_id: str, expires_at: float = 0.0) -> dict[str, Any]:
    return {
        "id": cmd_id,
        "type": "register_runner",
        "string_params": {"x": "y"},
        "expires_at": expires_at,
    }


def test_outbox_pending_in_order_then_acked_once(store: RedisStore, r: redis.Redis) -> None:
    store.save(Change(), {}, commands=[("v", command("c1"), 60), ("v", command("c2"), 60)])
    assert 0 < r.ttl(store.k.outbox("v")) <= 60
    assert [c["id"] for c in store.pending_commands("v", now=NOW)] == ["c1", "c2"]
    assert store.pending_commands("v", now=NOW) == [
        command("c1"),
        command("c2"),
    ]  # reading is not consuming
    assert store.ack_command("v", "c1", {"success": True}) is True
    assert store.ack_command("v", "c1", {"success": True}) is False  # a replayed ack
    assert store.command_outcome("c1") == {"success": True}
    assert [c["id"] for c in store.pending_commands("v", now=NOW)] == ["c2"]
    assert store.command_outcome("c2") is None
    assert store.ack_command("v", "never-sent", {"success": True}) is False
    assert store.pending_commands("other", now=NOW) == []


def test_a_replayed_ack_keeps_the_outcome_that_was_applied(store: RedisStore) -> None:
    """BUG (minor; adapters/lua/ack.lua): the store's ack record is SET on every ack, so
    a second ack of an already-acked command overwrites the outcome of the first, the
    only one `command_acked` applied. The gateway's own ack script (gateway/outbox.py)
    records the first ack only (SET NX); the store's `ack_command` should agree."""
    store.save(Change(), {}, commands=[("v", command("c1"), 60)])
    assert store.ack_command("v", "c1", {"success": True}) is True
    assert (
        store.ack_command("v", "c1", {"success": False, "message": "already configured"}) is False
    )
    assert store.command_outcome("c1") == {"success": True}


def test_outbox_drops_expired_commands(store: RedisStore, r: redis.Redis) -> None:
    store.save(
        Change(),
        {},
        commands=[
            ("v", command("old", NOW - 1), 60),
            ("v", command("edge", NOW), 60),
            ("v", command("new", NOW + 60), 60),
        ],
    )
    assert [c["id"] for c in store.pending_commands("v", now=NOW)] == ["new"]
    assert [i.decode() for i in r.lrange(store.k.outbox("v"), 0, -1)] == ["new"]
    assert r.hkeys(store.k.cmds("v")) == [b"new"]


def test_outbox_drops_ids_whose_payload_is_gone(store: RedisStore, r: redis.Redis) -> None:
    store.save(Change(), {}, commands=[("v", command("c1"), 60), ("v", command("c2"), 60)])
    r.hdel(store.k.cmds("v"), "c1")
    assert [c["id"] for c in store.pending_commands("v", now=NOW)] == ["c2"]
    assert [i.decode() for i in r.lrange(store.k.outbox("v"), 0, -1)] == ["c2"]


def test_outbox_written_with_the_vm_change(store: RedisStore) -> None:
    put_vms(store, ready_vm("v", reserved_job="j"))
    v, rev = store.get_vm("v") or pytest.fail("no vm")
    change = Change(vms={"v": v.with_(cmd_id="c1")})
    store.save(change, {"vm:v": rev}, commands=[("v", command("c1"), 60)])
    with pytest.raises(Conflict):  # a stale registration writes no command either
        store.save(change, {"vm:v": rev}, commands=[("v", command("c2"), 60)])
    assert [c["id"] for c in store.pending_commands("v", now=NOW)] == ["c1"]


def test_concurrent_acks_exactly_one_first(store: RedisStore, other_worker: Worker) -> None:
    store.save(Change(), {}, commands=[("v", command("c1"), 60)])
    workers = [other_worker() for _ in range(6)]
    results = race(6, lambda i: workers[i].ack_command("v", "c1", {"i": i}))
    assert sorted(results) == [False] * 5 + [True]
    assert store.pending_commands("v", now=NOW) == []


# -- heartbeats ----------------------------------------------------------------------------


def test_touch_heartbeats_updates_known_vms_without_bumping_rev(store: RedisStore) -> None:
    put_vms(store, ready_vm("a"), ready_vm("b"))
    assert store.touch_heartbeats({"a": NOW + 5, "b": NOW + 6, "ghost": NOW}) == 2
    a, rev = store.get_vm("a") or pytest.fail("no vm")
    assert (a.last_heartbeat, rev) == (NOW + 5, 1)
    assert (store.get_vm("b") or pytest.fail("no vm"))[0].last_heartbeat == NOW + 6
    assert store.touch_heartbeats({}) == 0


def test_touch_heartbeats_does_not_resurrect_a_deleted_vm(
    store: RedisStore, r: redis.Redis
) -> None:
    put_vms(store, ready_vm("gone"))
    store.save(Change(), {"vm:gone": 1}, deleted_vms=["gone"])
    assert store.touch_heartbeats({"gone": NOW}) == 0
    assert not r.exists(store.k.vm("gone"))
    assert store.get_vm("gone") is None
    assert store.get_vms() == []


# -- locks, debounce, counters ---------------------------------------------------------------


def test_try_lock_is_exclusive_across_workers(
    store: RedisStore, r: redis.Redis, other_worker: Worker
) -> None:
    other = other_worker()
    with store.try_lock("sync", timeout=30) as got:
        assert got is True
        assert 0 < r.pttl(store.k.lock("sync")) <= 30_000  # a crashed holder frees it
        with other.try_lock("sync", timeout=30) as also:
            assert also is False
        with other.try_lock("provision", timeout=30) as different:
            assert different is True
        assert r.exists(store.k.lock("sync"))  # the loser did not release it
    with other.try_lock("sync", timeout=30) as after:
        assert after is True


def test_try_lock_race_one_holder(store: RedisStore, other_worker: Worker) -> None:
    n = 6
    workers = [other_worker() for _ in range(n)]
    losers_done = threading.Event()
    lock = threading.Lock()
    losers = [0]

    def take(i: int) -> bool:
        with workers[i].try_lock("idle", timeout=30) as got:
            if got:
                # Hold it until every other worker has tried and given up.
                assert losers_done.wait(timeout=10)
            else:
                with lock:
                    losers[0] += 1
                    if losers[0] == n - 1:
                        losers_done.set()
            return bool(got)

    assert sorted(race(n, take)) == [False] * (n - 1) + [True]


def test_once_debounces_until_forgotten(store: RedisStore, other_worker: Worker) -> None:
    assert store.once("provision", 30) is True
    assert store.once("provision", 30) is False
    assert other_worker().once("provision", 30) is False
    store.forget("provision")
    assert store.once("provision", 30) is True


def test_counters(store: RedisStore) -> None:
    assert store.counters() == {}
    store.incr("created_vms", 3)
    store.incr("created_vms")
    store.save(Change(), {}, counters={"completed_jobs": 2, "created_vms": 1})
    store.dead_letter({"reason": "bad"})
    store.create_job(job("j"))
    assert store.counters() == {
        "created_vms": 5,
        "completed_jobs": 2,
        "dead_letters": 1,
        "jobs_received": 1,
    }
    assert store.dead_letters() == [{"reason": "bad"}]


def test_concurrent_increments_are_not_lost(store: RedisStore, other_worker: Worker) -> None:
    workers = [other_worker() for _ in range(8)]

    def bump(i: int) -> None:
        for _ in range(25):
            workers[i].incr("n")

    race(8, bump)
    assert store.counters()["n"] == 200


def test_scaled_window(store: RedisStore) -> None:
    store.record_scaled(["a", "b"], NOW - 120)
    store.record_scaled(["c"], NOW - 30)
    store.record_scaled(["a"], NOW)  # the same VM started again counts again
    store.record_scaled([], NOW)
    assert store.scaled_since(NOW - 60) == 2
    assert store.scaled_since(NOW - 3600) == 4


def test_pools_do_not_see_each_other(store: RedisStore, r: redis.Redis) -> None:
    other = RedisStore(r, "another-pool")
    store.create_job(job("j"))
    put_vms(store, ready_vm("v"))
    assert other.get_job("j") is None
    assert other.get_vms() == []
    assert other.queue_length() == 0
    assert other.create_job(job("j")) is True
    assert all(
        key.decode().startswith(("migctl:{store-test}:", "migctl:{another-pool}:"))
        for key in r.keys("*")
    )


# -- the state epoch -----------------------------------------------------------------------------


def test_state_epoch_notices_a_wipe_once_and_counts_it_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first, second = RedisStore(client, "pool-e"), RedisStore(client, "pool-e")
    gateway, beat = StateEpoch(first), StateEpoch(second)
    assert not gateway.check() and not beat.check()  # a first start is not a wipe
    assert not gateway.check() and not beat.check()
    client.flushall()
    assert gateway.check()  # it makes the key again: a wipe
    assert beat.check()  # the value it remembered changed: the same wipe
    assert not gateway.check() and not beat.check()  # once each
    counters = first.counters()
    assert counters["state_resets"] == 1
    assert counters["state_reset_at"] >= int(beat.reset_at) - 1
    fresh = StateEpoch(RedisStore(client, "pool-e"))
    assert not fresh.check()  # a process that never saw the old data cannot tell
    client.close()
