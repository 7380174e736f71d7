"""Redis wiped mid-run (FLUSHALL, or a Redis without persistence that restarts empty),
with jobs queued, assigned and running: the beat
notices the lost state epoch, restores its schedule and starts the recovery; the gateway
ends every stream so agents reconnect to the VM records the GCloud sync rebuilds from
the provider; queued jobs come back from GitHub's REST API; running ones are settled by
GitHub's events. Every job still ends exactly once, and the wipe is counted."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.sim.mig import SimMig
from migctl.sim.stack import POOL, LocalStack, RedisServer, StackOptions
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MAX_VMS = 6


@pytest.mark.parametrize("how", ["flushall", "empty_restart"])
def test_redis_wiped_mid_run_loses_no_job(how: str, tmp_path) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    stack = LocalStack(
        StackOptions(
            redis_url=server.url,
            use_emulator=False,
            separate_mig=True,  # the cloud is not in the controller's Redis
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=2,
            max_vms=MAX_VMS,
            job_duration=1.5,
            create_s=1.0,
            log_level="info",
            extra={"scheduler.assignment_timeout": "20s"},
        ),
        workdir=tmp_path,
    ).start()
    try:
        store = RedisStore(stack.redis, POOL)
        assert stack.github is not None
        ids = stack.submit(24)  # more than six VMs take at once: a queue builds
        # Wipe while jobs run and others wait.
        github = stack.github

        def running_and_waiting() -> Counter[str] | None:
            states = Counter(j["state"] for j in github.jobs() if j["job_id"] in ids)
            return states if states["in_progress"] >= 3 and states["queued"] >= 3 else None

        at_wipe = wait_until(running_and_waiting, "3 jobs running and 3 waiting", 120)
        ours_at_wipe = Counter(job.state.value for job, _ in store.get_jobs(ids))
        if how == "flushall":
            stack.redis.flushall()
        else:  # the processes lose their connections too, and find it empty
            server.stop()
            server.start()
        wiped = time.monotonic()
        mig = SimMig(stack.mig_redis, POOL)
        sizes = []
        for _ in range(8):
            ids += stack.submit(2)
            sizes.append(len(mig.list()))
            time.sleep(0.5)
        wait_all_terminal(stack, store, ids, 300)
        sizes.append(len(mig.list()))
        # Never scaled blind: the wiped records were not taken for an empty pool.
        assert max(sizes) <= MAX_VMS, sizes
        recovered_in = time.monotonic() - wiped
        check_exactly_once(stack, ids, counted=False)
        counters = store.counters()
        assert counters.get("state_resets") == 1, counters
        assert counters.get("state_reset_at", 0) > 0
        # The queue GitHub still held at the wipe came back from its REST API.
        if at_wipe["queued"]:
            assert counters.get("recovered_jobs", 0) >= 1, (at_wipe, counters)
        world = check_no_orphans(stack)
        # The beat's schedule is back: its canary (every 15 s) is consumed again.
        wait_until(
            lambda: stack.redis.get(store.k.prefix + "canary"),
            "the beat's canary after the wipe",
            60,
            every=0.5,
        )
        agents = list(stack.fleet.agents.values())
        assert not [a.finished for a in agents if a.finished], "an agent was turned away"
        print(
            f"{how}: {len(ids)} jobs; at the wipe GitHub had {dict(at_wipe)}, we had "
            f"{dict(ours_at_wipe)}; lost 0, doubled 0; recovered from GitHub's queue "
            f"{counters.get('recovered_jobs', 0)}; all terminal {recovered_in:.1f}s after "
            f"the wipe; MIG size at most {max(sizes)} of {MAX_VMS}; settled world {world}"
        )
    finally:
        stack.stop()
        server.stop()
