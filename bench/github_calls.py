"""GitHub API calls per job over a burst, per registration mode, on the whole local stack.

    python bench/github_calls.py --jobs 100

Runs LocalStack (bridge, worker, beat, gateway as processes; simulated MIG and agents;
the fake GitHub) once per mode, submits the burst at once, waits for every job to finish,
and reads FakeGitHub.calls: REST calls only (the fake's /_sim routes are the runner
binary's side, not the controller's). Then one runner-hygiene pass, to show its cost.

Modes: registration token (agents advertise nothing) and JIT (agents advertise "jit";
LocalStack has no option for it yet, so the bench sets the fleet's capabilities before
any VM is up and checks every VM record reported it).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import time
from pathlib import Path

from migctl.adapters.github import GithubApp
from migctl.adapters.redis_store import RedisStore
from migctl.services.hygiene import Hygiene
from migctl.settings import load_settings
from migctl.sim.stack import POOL, LocalStack, StackOptions

MODES = ("registration token", "jit")


def rest(calls: collections.Counter[str]) -> collections.Counter[str]:
    """The controller's calls: every route but the runner binary's /_sim ones."""
    return collections.Counter(
        {k: v for k, v in calls.items() if "/_sim" not in k and "unmatched" not in k}
    )


def run_mode(
    mode: str, jobs: int, max_vms: int, timeout: float, keep: bool = False
) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="migctl-ghcalls-"))
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            concurrency=8,
            min_ready_vms=2,
            max_vms=max_vms,
            job_duration=0.5,
            create_s=1.0,
            heartbeat_interval=1.0,
        ),
        workdir=workdir,
    )
    try:
        stack.start()
        if mode == "jit":
            stack.fleet.capabilities = ("jit",)
        assert stack.github is not None
        store = RedisStore(stack.redis, POOL)
        before = rest(stack.github.calls.copy())
        started = time.monotonic()
        ids = stack.submit(jobs)
        while True:
            done = store.get_jobs(ids)
            if len(done) == jobs and all(job.state.terminal for job, _ in done):
                break
            dead = [n for n, alive in stack.alive().items() if not alive]
            if dead or time.monotonic() - started > timeout:
                raise SystemExit(f"{mode}: stalled (dead processes: {dead})")
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        burst = rest(stack.github.calls.copy()) - before
        completed = sum(1 for job, _ in done if job.state.name == "COMPLETED")
        jit_vms = sum(1 for vm, _ in store.get_vms() if "jit" in vm.capabilities)

        settings = load_settings(stack.config_path)
        app = GithubApp(settings.github_app, stack.redis, POOL)
        try:
            ahead = rest(stack.github.calls.copy())
            report = Hygiene(store, app, settings).run()
            hygiene = rest(stack.github.calls.copy()) - ahead
        finally:
            app.close()
        return {
            "mode": mode,
            "jobs": jobs,
            "completed": completed,
            "seconds": elapsed,
            "vms": len(store.get_vms()),
            "jit_vms": jit_vms,
            "calls": burst,
            "hygiene_calls": hygiene,
            "hygiene_listed": report.listed,
        }
    finally:
        stack.stop()
        if keep:
            print(f"{mode}: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs in the burst")
    parser.add_argument("--max-vms", type=int, default=20, help="pool size limit")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mode")
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--keep", action="store_true", help="keep each stack's logs")
    args = parser.parse_args()
    modes = MODES if args.mode == "all" else (args.mode,)
    results = [run_mode(mode, args.jobs, args.max_vms, args.timeout, args.keep) for mode in modes]
    for r in results:
        calls: collections.Counter[str] = r["calls"]  # type: ignore[assignment]
        total = sum(calls.values())
        jobs = int(r["jobs"])  # type: ignore[call-overload]
        print(
            f"\n== {r['mode']}: {jobs} jobs ({r['completed']} completed) in "
            f"{r['seconds']:.1f}s on {r['vms']} VMs ({r['jit_vms']} advertised jit)"
        )
        print(f"   GitHub REST calls: {total}  =>  {total / jobs:.2f} per job")
        for route, n in sorted(calls.items(), key=lambda kv: -kv[1]):
            print(f"   {n:6d}  {route}")
        hygiene: collections.Counter[str] = r["hygiene_calls"]  # type: ignore[assignment]
        print(
            f"   one hygiene pass afterwards: {sum(hygiene.values())} call(s) "
            f"({dict(hygiene)}), {r['hygiene_listed']} runner(s) listed"
        )


if __name__ == "__main__":
    main()
