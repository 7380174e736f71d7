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


# Who notices first: GitHub (its lost-runner timeout shorter than the controller's
# health sweep), or the controller (as with real GitHub, which takes minutes): then the
# job must wait, bound to its lost VM, for GitHub's verdict, not be queued again.
ORDERS = {
    "github_first": {"lost_runner_timeout": 3.0, "heartbeat_timeout": "20s"},
    "controller_first": {"lost_runner_timeout": 35.0, "heartbeat_timeout": "6s"},
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_vms_vanishing_mid_job_lose_no_job(order: str, tmp_path) -> None:
    timings = ORDERS[order]
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=2,
            max_vms=10,
            job_duration=2.0,
            create_s=1.0,
            heartbeat_interval=1.0,
            lost_runner_timeout=float(timings["lost_runner_timeout"]),
            log_level="info",
            extra={
                "scheduler.assignment_timeout": "20s",
                "vm_manager.heartbeat_timeout": timings["heartbeat_timeout"],
            },
        ),
        workdir=tmp_path,
    ).start()
    try:
        store = RedisStore(stack.redis, POOL)
        mig = SimMig(stack.mig_redis, POOL)
        ids: list[str] = []
        vanished: dict[str, str] = {}  # job id -> the VM it was running on
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
                vanished[caught[1]] = caught[0]
        started = time.monotonic()
        wait_all_terminal(stack, store, ids, 300)
        settled = time.monotonic() - started
        counters = check_exactly_once(stack, ids)
        assert stack.github is not None
        gh = {j["job_id"]: j for j in stack.github.jobs()}
        failed = {i for i in ids if gh[i]["conclusion"] == "failure"}
        # Only jobs on a VM that vanished failed (GitHub lost their runners): the job we saw
        # there, or one its runner took in the moment before the VM's agent went.
        gone = set(vanished.values())
        assert all(gh[i]["runner_name"] in gone for i in failed), (failed, vanished)
        # (A job we saw on a vanishing VM may still have finished first: the fleet notices
        # the VM is gone within its poll; it then succeeded, bound and counted as any.)
        assert len(failed) >= 2, f"only {len(failed)} vanishings landed mid-job"
        assert stack.github.lost_runners == len(failed)
        ours = {job.id: job for job, _ in store.get_jobs(sorted(set(vanished) | failed))}
        assert {i: ours[i].vm_id for i in vanished} == vanished  # bound where it ran
        # Which side noticed first: the controller marks a job whose VM it lost.
        first = [i for i in failed if 0 < ours[i].lost_at < gh[i]["completed_at"]]
        if order == "controller_first":
            assert first, "the controller never noticed a vanished VM before GitHub did"
        assert counters.get("requeued_jobs", 0) == 0, counters  # none queued again
        world = check_no_orphans(stack)
        print(
            f"{order}: {len(ids)} jobs, {VANISH} VMs vanished mid-job -> {len(failed)} failed "
            f"on GitHub, {len(first)} of them marked lost by the controller first; "
            f"0 lost, 0 doubled; requeued {counters.get('requeued_jobs', 0)}; "
            f"all terminal {settled:.1f}s after the last fault; settled world {world}"
        )
    finally:
        stack.stop()
