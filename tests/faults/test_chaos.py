"""Everything at once, in one run: every Pub/Sub message published twice and a second
bridge on the same subscription, every agent event sent twice, two beats, the MIG
failing (30 % of calls, bursts of temporary errors, out of capacity for a minute) and
GitHub failing (5xx, rate limits)."""

from __future__ import annotations

import time

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.domain.errors import TemporaryError
from migctl.sim.mig import SimMig
from migctl.sim.pubsub_emulator import find_emulator
from migctl.sim.stack import POOL, LocalStack, StackOptions
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal
from tests.helpers import require

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 40
CAPACITY_OUT_S = 60.0


def test_duplicates_second_bridge_two_beats_and_failing_providers(tmp_path) -> None:
    require(find_emulator() is not None, "the Pub/Sub emulator")
    stack = LocalStack(
        StackOptions(
            use_emulator=True,
            publish_copies=2,
            agent_options={"duplicate_events": True},
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=1,
            max_vms=8,
            job_duration=0.5,
            create_s=1.0,
            log_level="info",
            extra={"scheduler.assignment_timeout": "20s"},
        ),
        workdir=tmp_path,
    )
    try:
        stack.start()
        stack._spawn("bridge2", "bridge")
        stack._spawn("beat2", "beat")
        assert stack.github is not None
        store = RedisStore(stack.redis, POOL)
        mig = SimMig(stack.mig_redis, POOL)
        ids: list[str] = []
        faults = {
            "mig_temporary": 0,
            "capacity_windows": 0,
            "github_5xx": 0,
            "github_rate_limited": 0,
        }
        # 30 % of the MIG's calls fail (temporary) for the whole run, and it is out of
        # capacity for a minute at the start, while demand builds.
        mig.fail_rate(0.3)
        mig.capacity_exhausted_until(time.time() + CAPACITY_OUT_S)
        faults["capacity_windows"] += 1
        for round_ in range(8):
            ids += stack.submit(JOBS // 8)
            if round_ % 2 == 0:
                mig.fail_next(3, TemporaryError("injected: backend error"))
                faults["mig_temporary"] += 3
            if round_ % 3 == 1:
                stack.github.fail_next(2, status=502)
                faults["github_5xx"] += 2
            if round_ == 5:
                stack.github.rate_limit_next(2, retry_after=1)
                faults["github_rate_limited"] += 2
            time.sleep(1.0)
        wait_all_terminal(stack, store, ids, 300)
        mig.fail_rate(0)
        counters = check_exactly_once(stack, ids)
        world = check_no_orphans(stack)
        bridge = store.bridge_stats()
        errors = {k: v for k, v in counters.items() if k.startswith("provider_errors")}
        print(f"{len(ids)} jobs x2 messages, 2 bridges, 2 beats, events x2; faults {faults}")
        print(f"duplicates seen {bridge.get('duplicates')}; provider errors {errors}")
        print(f"lost 0, doubled 0; settled world {world}")
    finally:
        stack.stop()
