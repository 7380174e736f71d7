"""The cold path through the whole local stack: queue-to-job-start when no VM is ready,
minus the VM's own time, is the controller's overhead.

    python bench/cold_bench.py [--scale 0.1] [--jobs 8] [--json OUT]

LocalStack (migctl.sim.stack) with its real processes (bridge on the local job source,
worker, beat, gateway), the simulated MIG with GCE-like timings
(SimTimings.gce_like(): create 40 s, start 20 s, resume 8 s, stop/suspend 10 s, delete
15 s) all multiplied by `--scale` (0.1 by default: create 4 s, start 2 s, ...; every
VM timing is scaled, the controller's own settings are not), simulated agents speaking
the real gRPC protocol, and the fake GitHub that hands a queued job to a runner.

Two phases, `--jobs` jobs each, submitted at once on GitHub:
A. empty pool (min_ready_vms 0): every job needs a new VM (create);
B. after idle stop has stopped those VMs (idle_timeout 3 s): every job needs a
   stopped VM started (start).
Per job: queue-to-start = GitHub's started_at - created_at; the VM's own time = the
simulated action's duration for the VM that ran it (SimMig record: done_at - since);
overhead = the difference (the floor is the VM's own time: ratio = queue-to-start / VM
time). The per-VM timeline (`migctl explain` hops) splits the overhead into hops.
Target: overhead p95 <= 2 s.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, pct, write_json
from migctl.adapters.redis_store import RedisStore
from migctl.sim.mig import SimTimings
from migctl.sim.stack import POOL, LocalStack, StackOptions


def timings(scale: float) -> SimTimings:
    g = SimTimings.gce_like()
    return SimTimings(
        create_s=g.create_s * scale,
        start_s=g.start_s * scale,
        resume_s=g.resume_s * scale,
        stop_s=g.stop_s * scale,
        suspend_s=g.suspend_s * scale,
        delete_s=g.delete_s * scale,
    )


def mig_records(stack: LocalStack) -> dict[str, dict[str, Any]]:
    raw = stack.redis.hgetall(f"migctl:{{{POOL}}}:sim:mig")
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def gh_job(stack: LocalStack, job_id: str) -> Any:
    assert stack.github is not None
    return stack.github._jobs.get(job_id)  # the fake's record: created_at, started_at


def wait(pred: Any, what: str, timeout: float, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        dead = [n for n, alive in stack.alive().items() if not alive]
        if dead:
            raise RuntimeError(f"{dead} died: {stack.log_tail(dead[0])}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def phase(stack: LocalStack, name: str, n: int, action: str, duration: float) -> dict[str, Any]:
    store = RedisStore(stack.redis, POOL)
    ids = stack.submit(n, duration=duration)

    def started() -> bool:
        return all((j := gh_job(stack, i)) is not None and j.started_at for i in ids)

    wait(started, f"phase {name}: {n} jobs started", 120, stack)
    mig = mig_records(stack)  # before any further mutation rewrites `since`/`done_at`
    timelines = {i: store.get_timeline(i) for i in ids}
    by_vm: dict[str, dict[str, str]] = {}
    for tl in timelines.values():
        if tl.get("vm") and "command_sent_at" in tl:
            by_vm.setdefault(tl["vm"], tl)
    rows = []
    for job_id in ids:
        gj = gh_job(stack, job_id)
        vm = gj.runner_name
        rec = mig.get(vm, {})
        vm_time = float(rec.get("done_at", 0)) - float(rec.get("since", 0)) if rec else 0.0
        q2s = gj.started_at - gj.created_at
        tl = by_vm.get(vm, {})

        def at(key: str, tl: dict[str, str] = tl) -> float:
            return float(tl[key]) if key in tl else float("nan")

        call, running = float(rec.get("since", "nan")), float(rec.get("done_at", "nan"))
        rows.append(
            {
                "job": job_id,
                "vm": vm,
                "queue_to_start": q2s,
                "vm_time": vm_time,
                "overhead": q2s - vm_time,
                "timeline": tl,
                "mig": rec,
                "hops": {
                    "queued -> provider call": call - gj.created_at,
                    "VM running -> agent ready": at("vm_ready_at") - running,
                    "agent ready -> register_runner sent": at("command_sent_at")
                    - at("vm_ready_at"),
                    # relay, the agent registering its runner on GitHub, GitHub's dispatch
                    "register_runner sent -> job started": gj.started_at - at("command_sent_at"),
                },
            }
        )
    overheads = [r["overhead"] for r in rows]
    hops = {hop: median(r["hops"][hop] for r in rows) for hop in rows[0]["hops"]}
    return {
        "phase": name,
        "action": action,
        "jobs": n,
        "queue_to_start_p95": pct([r["queue_to_start"] for r in rows], 95),
        "vm_time_median": median(r["vm_time"] for r in rows),
        "overhead_p50": pct(overheads, 50),
        "overhead_p95": pct(overheads, 95),
        "overhead_max": max(overheads),
        "hops_median": hops,
        # which simulated action brought up each job's VM (CREATING = create, STARTING =
        # start/resume), from its SimMig record
        "paths": dict(collections.Counter(r["mig"].get("status", "?") for r in rows)),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    t = timings(args.scale)
    job_s = 3.0
    options = StackOptions(
        use_emulator=False,
        processes=("bridge", "worker", "beat", "gateway"),
        min_ready_vms=0,
        max_vms=max(20, 2 * args.jobs),
        idle_timeout=3.0,
        job_duration=job_s,
        create_s=t.create_s,
        extra={
            "sim.start_s": t.start_s,
            "sim.resume_s": t.resume_s,
            "sim.stop_s": t.stop_s,
            "pool.idle_action": "stop",
            "pool.post_job": "warm",
        },
    )
    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the stack
    stack = LocalStack(options).start()
    result: dict[str, Any] = {"scale": args.scale, "timings": t.__dict__, "phases": []}
    try:
        from migctl.settings import load_settings
        from migctl.worker.app import build_app

        store = RedisStore(stack.redis, POOL)
        app = build_app(load_settings(str(stack.config_path)))
        wait(lambda: app.control.ping(timeout=0.5), "a worker answering ping", 90, stack)
        time.sleep(3.0)  # beat's first ticks (sync, reconcile), the gateway listening
        a = phase(stack, "A", args.jobs, "create", job_s)
        result["phases"].append(a)

        def all_stopped() -> bool:
            recs = mig_records(stack)
            return bool(recs) and all(
                (r["target"] or r["status"]) == "STOPPED" and time.time() >= r["done_at"]
                for r in recs.values()
            )

        wait(all_stopped, "idle stop of phase A's VMs", 90, stack)
        # ...and until the controller knows it (the GCloud sync observes STOPPED; before
        # that, demand would create new VMs rather than start these).
        from migctl.domain.model import VmState

        wait(
            lambda: all(vm.state is VmState.STOPPED for vm, _ in store.get_vms()),
            "the sync to record the stopped VMs",
            60,
            stack,
        )
        b = phase(stack, "B", args.jobs, "start", job_s)
        result["phases"].append(b)
    finally:
        stack.stop()
    overheads = [r["overhead"] for p in result["phases"] for r in p["rows"]]
    q2s = [r["queue_to_start"] for p in result["phases"] for r in p["rows"]]
    vmt = [r["vm_time"] for p in result["phases"] for r in p["rows"]]
    result["overhead_p95"] = pct(overheads, 95)
    result["ratio_p95"] = pct([q / v for q, v in zip(q2s, vmt, strict=True) if v], 95)
    result["elapsed_s"] = time.time() - started
    print(
        f"cold path through LocalStack, GCE-like VM timings x{args.scale:g} "
        f"(create {t.create_s:g}s, start {t.start_s:g}s, resume {t.resume_s:g}s)"
    )
    for p in result["phases"]:
        print(
            f"  phase {p['phase']} ({p['action']}, {p['jobs']} jobs): queue-to-start p95 "
            f"{p['queue_to_start_p95']:.2f}s, VM time {p['vm_time_median']:.2f}s, overhead "
            f"p50 {p['overhead_p50']:.2f}s p95 {p['overhead_p95']:.2f}s "
            f"max {p['overhead_max']:.2f}s; VMs by action {p['paths']}"
        )
        print("    median hops: " + "; ".join(f"{k} {v:.2f}s" for k, v in p["hops_median"].items()))
    print(
        f"  overhead p95 (both phases) {result['overhead_p95']:.2f}s; target <= 2 s: "
        f"{'PASS' if result['overhead_p95'] <= 2 else 'SHORT'}; queue-to-start / VM time p95 "
        f"{result['ratio_p95']:.2f}x; took {result['elapsed_s']:.0f}s"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
