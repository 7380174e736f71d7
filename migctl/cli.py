"""`migctl`: the command line for people. `up` runs the local world with a demo workload;
`submit` adds jobs to a running one; `status` and `deadletters` read a pool's state."""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STATE_FILE = Path(".migctl") / "stack.json"


def _fail(message: str, code: int = 2) -> int:
    print(f"migctl: {message}", file=sys.stderr)
    return code


# -- up ----------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from migctl.adapters.redis_store import RedisStore
    from migctl.sim.stack import POOL, LocalStack, StackOptions

    options = StackOptions(
        redis_url=args.redis or "",
        use_emulator=False if args.no_emulator else None,
        workers=args.workers,
        min_ready_vms=args.min_ready,
        max_vms=args.max_vms,
        job_duration=args.job_duration,
        log_level="info" if args.verbose else "warning",
    )
    if args.jobs < 0:
        return _fail("--jobs must be 0 or more")
    print(
        "migctl up: starting the local world "
        "(redis, pub/sub, worker, beat, gateway, bridge, flower, agents)..."
    )
    started = time.monotonic()
    stack = LocalStack(options)
    interrupted = False

    def on_signal(*_: Any) -> None:
        raise KeyboardInterrupt

    # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        STATE_FILE.parent.mkdir(exist_ok=True)
        assert stack.github is not None
        STATE_FILE.write_text(
            json.dumps(
                {
                    "github_url": stack.github.url,
                    "redis_url": stack.redis_url,
                    "config": str(stack.config_path),
                    "http": f"http://127.0.0.1:{stack.ports['http']}",
                    "flower": f"http://127.0.0.1:{stack.ports['flower']}",
                }
            )
        )
        store = RedisStore(stack.redis, POOL)
        source = (
            "Pub/Sub emulator " + stack.emulator_host
            if stack.emulator
            else "local Redis job source (no emulator)"
        )
        print(
            f"  redis     {stack.redis_url}\n"
            f"  jobs via  {source}\n"
            f"  gRPC      127.0.0.1:{stack.ports['grpc']}\n"
            f"  HTTP      http://127.0.0.1:{stack.ports['http']}/stats\n"
            f"  flower    http://127.0.0.1:{stack.ports['flower']} (admin:local-only)\n"
            f"  logs      {stack.workdir}"
        )
        print(f"  ready in {time.monotonic() - started:.1f}s; submitting {args.jobs} demo jobs")
        t0 = time.monotonic()
        ids = stack.submit(args.jobs) if args.jobs else []
        ok = _watch(stack, store, ids, args.timeout)
        _summary(stack, store, ids, time.monotonic() - t0)
        if args.keep_running:
            print(
                "stack is up (--keep-running). `migctl submit` adds jobs; Ctrl-C stops everything."
            )
            while True:
                time.sleep(2)
                dead = [n for n, alive in stack.alive().items() if not alive]
                if dead:
                    return _fail(
                        f"process(es) died: {', '.join(dead)}; see logs in {stack.workdir}", 1
                    )
        return 0 if ok else 1
    except KeyboardInterrupt:
        interrupted = True
        print("\nstopping...")
        return 130
    except Exception as exc:
        return _fail(f"the local world failed: {exc} (logs in {stack.workdir})", 1)
    finally:
        stack.stop()
        if STATE_FILE.exists():
            STATE_FILE.unlink()
        if not interrupted:
            print("all processes stopped.")


def _watch(stack: Any, store: Any, ids: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        jobs = {job.id: job for job, _ in store.get_jobs(ids)}
        states: dict[str, int] = {}
        for job_id in ids:
            state = jobs[job_id].state.value if job_id in jobs else "PUBLISHED"
            states[state] = states.get(state, 0) + 1
        vms = [vm for vm, _ in store.get_vms()]
        vm_states: dict[str, int] = {}
        for vm in vms:
            vm_states[vm.state.value] = vm_states.get(vm.state.value, 0) + 1
        line = (
            "jobs "
            + " ".join(f"{k}={v}" for k, v in sorted(states.items()))
            + " | vms "
            + " ".join(f"{k}={v}" for k, v in sorted(vm_states.items()))
        )
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}")
            last = line
        done = sum(1 for j in jobs.values() if j.state.terminal)
        if done == len(ids):
            return all(j.state.value == "COMPLETED" for j in jobs.values())
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            print(f"process(es) died: {', '.join(dead)}")
            for name in dead:
                print(f"--- {name} log ---\n{stack.log_tail(name)}")
            return False
        if time.monotonic() > deadline:
            print(f"timed out after {timeout:.0f}s with {len(ids) - done} job(s) unfinished")
            return False
        time.sleep(1)


def _summary(stack: Any, store: Any, ids: list[str], elapsed: float) -> None:
    jobs = [job for job, _ in store.get_jobs(ids)]
    print("\n  VM                         STATE       JOBS RUN")
    per_vm: dict[str, int] = {}
    for job in jobs:
        if job.vm_id:
            per_vm[job.vm_id] = per_vm.get(job.vm_id, 0) + 1
    for vm, _ in store.get_vms():
        print(f"  {vm.id:<26} {vm.state.value:<11} {per_vm.get(vm.id, 0)}")
    waits = sorted(j.started_at - j.received_at for j in jobs if j.started_at and j.received_at)
    completed = sum(1 for j in jobs if j.state.value == "COMPLETED")
    c = store.counters()
    print(
        f"\nsummary: {completed}/{len(ids)} jobs COMPLETED in {elapsed:.1f}s; "
        f"VMs created {c.get('created_vms', 0)}, started {c.get('started_vms', 0)}; "
        f"dead letters {c.get('dead_letters', 0)}"
    )
    if waits:
        p95 = waits[min(len(waits) - 1, int(len(waits) * 0.95))]
        print(
            f"queue-to-start wait: p50 {statistics.median(waits):.2f}s, "
            f"p95 {p95:.2f}s, max {waits[-1]:.2f}s"
        )


# -- submit ---------------------------------------------------------------------------------


def _state() -> dict[str, Any] | None:
    return json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else None


def cmd_submit(args: argparse.Namespace) -> int:
    import requests

    state = _state()
    if state is None:
        return _fail(
            "no running local world here: "
            "start one with `migctl up --keep-running` (in this directory)"
        )
    if args.count < 1:
        return _fail("--count must be at least 1")
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    out = []
    for _ in range(args.count):
        resp = requests.post(
            f"{state['github_url']}/_sim/jobs",
            json={
                "org": "local-org",
                "repo": args.repo,
                "labels": labels,
                "duration": args.duration,
            },
            timeout=10,
        )
        if resp.status_code != 201:
            return _fail(
                f"the fake GitHub refused the job: {resp.status_code} {resp.text.strip()}", 1
            )
        out.append(resp.json()["job_id"])
    print("submitted job(s): " + ", ".join(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser("up", help="run the whole local world with a demo workload")
    up.add_argument("--jobs", type=int, default=20, help="demo jobs to run (default 20)")
    up.add_argument("--keep-running", action="store_true", help="leave the stack up after the demo")
    up.add_argument(
        "--redis", help="use this Redis (redis://HOST:PORT/DB) instead of an embedded one"
    )
    up.add_argument(
        "--no-emulator",
        action="store_true",
        help="use the local job source even if the emulator exists",
    )
    up.add_argument("--workers", type=int, default=1, help="Celery worker processes (default 1)")
    up.add_argument("--min-ready", type=int, default=1, help="warm pool size (default 1)")
    up.add_argument("--max-vms", type=int, default=10, help="pool limit (default 10)")
    up.add_argument(
        "--job-duration", type=float, default=2.0, help="seconds each demo job runs (default 2)"
    )
    up.add_argument(
        "--timeout", type=float, default=300.0, help="give up on the demo after this many seconds"
    )
    up.add_argument(
        "-v", "--verbose", action="store_true", help="info-level logs from the processes"
    )
    up.set_defaults(func=cmd_up)
    submit = sub.add_parser("submit", help="add jobs to a running `migctl up --keep-running`")
    submit.add_argument("--count", type=int, default=1)
    submit.add_argument(
        "--labels", default="self-hosted,linux,x64", help="comma-separated runs-on labels"
    )
    submit.add_argument("--repo", default="local-org/demo", help="owner/name")
    submit.add_argument("--duration", type=float, default=2.0, help="seconds the job runs")
    submit.set_defaults(func=cmd_submit)
    from migctl.cli_ops import register as register_ops

    register_ops(sub)
    from migctl.simulate.cli import register as register_simulate

    register_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from migctl.settings import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
