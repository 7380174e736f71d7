"""VMs vanish mid-job (deleted out of band, as a preemption or a person does): the
running stack notices through the GCloud sync, GitHub fails the lost runner's job, and
every job still ends exactly once with GitHub's outcome; no VM record or runner is left
behind for a VM that is gone."""

from __future__ import annotations

import time

import pytest

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState
from migctl.sim.mig import SimMig
from migctl.sim.stack import POOL, LocalStack, StackOptions
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 40
VANISH = 5


def running_job(stack: LocalStack) -> tuple[str, str] | None:
    """(vm, job id) of one agent that is running a job now, if any."""
    for name, agent in list(stack.fleet.agents.items()):
        job = agent.current_job
        if job is not None and agent.state is AgentState.JOB_RUNNING:
            return name, str(job["job_id"])
    return None


def test_vms_vanishing_mid_job_lose_no_job(tmp_path) -> None:
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=2,
            max_vms=10,
            job_duration=2.0,
            create_s=1.0,
            lost_runner_timeout=3.0,
            log_level="info",
            extra={"scheduler.assignment_timeout": "20s"},
        ),
        workdir=tmp_path,
    ).start()
    try:
        store = RedisStore(stack.redis, POOL)
        mig = SimMig(stack.mig_redis, POOL)
        ids: list[str] = []
        vanished: dict[str, str] = {}  # job id -> the VM it was running on
        vanished_at: dict[str, float] = {}
        rounds = 0
        while len(ids) < JOBS or len(vanished) < VANISH:
            rounds += 1
            assert rounds < 200, f"only {len(vanished)} VMs vanished mid-job"
            if len(ids) < JOBS:
                ids += stack.submit(4)
            time.sleep(0.5)
            if len(vanished) >= VANISH:
                continue
            caught = running_job(stack)
            if caught is not None and caught[1] in ids and caught[1] not in vanished:
                mig.vanish(caught[0])
                vanished[caught[1]], vanished_at[caught[1]] = caught[0], time.time()
        started = time.monotonic()
        wait_all_terminal(stack, store, ids, 300)
        settled = time.monotonic() - started
        counters = check_exactly_once(stack, ids)
        assert stack.github is not None
        gh = {j["job_id"]: j for j in stack.github.jobs()}
        failed = {i for i in ids if gh[i]["conclusion"] == "failure"}
        # Only jobs whose VM vanished failed (GitHub lost their runners); one that beat
        # the fleet noticing its VM was gone finished before the vanishing.
        assert failed <= set(vanished), (failed, vanished)
        for job_id in set(vanished) - failed:
            assert gh[job_id]["completed_at"] <= vanished_at[job_id] + 1.0, gh[job_id]
        assert len(failed) >= VANISH - 2, f"only {len(failed)} vanishings landed mid-job"
        assert stack.github.lost_runners == len(failed)
        ours = {job.id: job for job, _ in store.get_jobs(list(vanished))}
        assert {i: j.vm_id for i, j in ours.items()} == vanished  # bound where it ran
        world = check_no_orphans(stack)
        print(
            f"{len(ids)} jobs, {VANISH} VMs vanished mid-job -> {len(failed)} failed on GitHub "
            f"(lost runners), 0 lost, 0 doubled; requeued {counters.get('requeued_jobs', 0)}; "
            f"all terminal {settled:.1f}s after the last fault; settled world {world}"
        )
    finally:
        stack.stop()
