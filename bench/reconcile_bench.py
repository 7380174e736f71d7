"""One reconcile pass over a 1,000-VM pool in steady state: warm pool (`Pool.provision`),
idle stop (`Pool.idle_stop`) and GCloud sync (`Pool.sync`), in one process against a
private redis-server and the simulated MIG.

    python bench/reconcile_bench.py [--vms 1000] [--repeats 3] [--json OUT]

Measured per pass: CPU time of this process (`time.process_time`), wall time, Redis
round trips (a counting connection) and the provider calls (a wrapping VmProvider that
counts calls per kind and the VMs in each). The pool policy never scales up and down in
the same pass (idle stop waits while jobs are queued), so two steady states are run:

- scale-down: 60% busy, 30% free of which two thirds idle past idle_timeout above the
  warm pool (half with a registered runner: drained first; half without: stopped), 5%
  stopped, 5% suspended;
- scale-up: 90% busy, 4% stopped, 4% suspended, 2% starting, 100 queued jobs: resume,
  start, then create.

Floor, in the same run: the CPU time of reading the pool once (`RedisStore.get_vms()`:
one pipelined HGETALL per VM and their decoding), the least any pass must do.
Target: <= 50 ms CPU per pass, and one batched provider call per action kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LABELS, median, ratio, write_json
from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, InfraStatus, Job, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.ports import ProviderVm
from migctl.services.pool import Pool
from migctl.settings import Settings
from migctl.sim.mig import SimMig, SimTimings
from migctl.sim.stack import RedisServer

POOL = "recon"
IDLE_TIMEOUT = 600.0


class CountingConnection(redis.Connection):
    round_trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.round_trips += 1
        super().send_packed_command(command, check_health)


class CountingProvider:
    """A VmProvider that counts each call and the VMs it names, then delegates."""

    def __init__(self, inner: SimMig) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.vms: collections.Counter[str] = collections.Counter()

    def list(self) -> list[ProviderVm]:
        self.calls["list"] += 1
        return self.inner.list()

    def _do(self, kind: str, names: Sequence[str]) -> None:
        self.calls[kind] += 1
        self.vms[kind] += len(names)
        getattr(self.inner, kind)(names)

    def create(self, names: Sequence[str]) -> None:
        self._do("create", names)

    def start(self, names: Sequence[str]) -> None:
        self._do("start", names)

    def stop(self, names: Sequence[str]) -> None:
        self._do("stop", names)

    def suspend(self, names: Sequence[str]) -> None:
        self._do("suspend", names)

    def resume(self, names: Sequence[str]) -> None:
        self._do("resume", names)

    def delete(self, names: Sequence[str]) -> None:
        self._do("delete", names)


class NullDispatch:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def assign_job(self, job_id: str) -> None:
        self.calls["assign_job"] += 1

    def assign_vm(self, vm_id: str) -> None:
        self.calls["assign_vm"] += 1

    def provision(self) -> None:
        self.calls["provision"] += 1


def settings(vms: int) -> Settings:
    return Settings(
        pool={"id": POOL, "labels": LABELS, "idle_action": "stop"},
        vm_manager={
            "provider": "sim",
            "max_vms": vms + 50,
            "min_ready_vms": 50,
            "idle_timeout": IDLE_TIMEOUT,
            "max_scale_up_per_minute": 1000,
        },
        scheduler={"max_concurrent_assignments": 100},
        github_app={"app_id": "1", "private_key": "unused", "org": "o"},
        pubsub={"source": "local"},
    )


def build(client: redis.Redis, n: int, kind: str) -> None:
    """A steady-state pool: store records and the sim MIG agree."""
    client.flushdb()
    now = time.time()
    store = RedisStore(client, POOL)
    mig_key = f"migctl:{{{POOL}}}:sim:mig"
    plan: list[tuple[str, str]] = []  # (shape, provider status)
    if kind == "scale-down":
        shares = [("busy", 0.60), ("free-recent", 0.10), ("idle-registered", 0.10)]
        shares += [("idle-bare", 0.10), ("stopped", 0.05), ("suspended", 0.05)]
    else:
        shares = [("busy", 0.90), ("stopped", 0.04), ("suspended", 0.04), ("starting", 0.02)]
    for shape, share in shares:
        plan += [(shape, "")] * round(n * share)
    plan = plan[:n]
    records: dict[str, str] = {}
    change = Change()
    for i, (shape, _) in enumerate(plan):
        vm_id = f"{POOL}-{i:05d}"
        base = Vm(
            id=vm_id,
            labels=tuple(LABELS),
            infra=InfraStatus.RUNNING,
            created_at=now - 86400,
            state_since=now - 3600,
            last_heartbeat=now - 1,
        )
        if shape == "busy":
            vm = base.with_(
                agent=AgentState.JOB_RUNNING,
                connected=True,
                runner_registered=True,
                job_id=f"j{i}",
                last_active=now - 30,
            )
        elif shape == "free-recent":
            vm = base.with_(agent=AgentState.READY, connected=True, last_active=now - 10 - i % 50)
        elif shape == "idle-registered":
            vm = base.with_(
                agent=AgentState.IDLE,
                connected=True,
                runner_registered=True,
                last_active=now - IDLE_TIMEOUT - 100,
            )
        elif shape == "idle-bare":
            vm = base.with_(
                agent=AgentState.READY, connected=True, last_active=now - IDLE_TIMEOUT - 100
            )
        elif shape == "stopped":
            vm = base.with_(infra=InfraStatus.STOPPED, last_active=now - 7200)
        elif shape == "suspended":
            vm = base.with_(infra=InfraStatus.SUSPENDED, last_active=now - 7200)
        else:  # starting: asked to start a moment ago, not up yet
            vm = base.with_(
                infra=InfraStatus.STARTING,
                lifecycle=Lifecycle.STARTING,
                state_since=now - 5,
                last_heartbeat=0.0,
            )
        change.vm(vm)
        status = {"stopped": "STOPPED", "suspended": "SUSPENDED"}.get(shape, "RUNNING")
        rec = {"status": status, "since": now - 3600, "target": "", "done_at": now - 3600}
        if shape == "starting":
            rec = {"status": "STARTING", "since": now - 5, "target": "RUNNING", "done_at": now + 60}
        rec["created_at"] = now - 86400
        records[vm_id] = json.dumps(rec)
        if len(change.vms) >= 500:
            store.save(change, {})
            change = Change()
    if change.vms:
        store.save(change, {})
    client.hset(mig_key, mapping=records)
    if kind == "scale-up":
        for j in range(100):
            store.create_job(
                Job(id=f"q{j}", labels=("self-hosted", "linux"), pool_id=POOL, received_at=now)
            )


def one_pass(client: redis.Redis, n: int, kind: str) -> dict[str, Any]:
    build(client, n, kind)
    s = settings(n)
    store = RedisStore(client, POOL)
    provider = CountingProvider(SimMig(client, POOL, SimTimings.gce_like()))
    pool = Pool(store, provider, s, NullDispatch())  # type: ignore[arg-type]
    # Floor: one read of the pool.
    c0, rt0 = time.process_time(), CountingConnection.round_trips
    store.get_vms()
    floor_cpu = time.process_time() - c0
    floor_rt = CountingConnection.round_trips - rt0
    steps: dict[str, Any] = {}
    w0, c0, rt0 = time.perf_counter(), time.process_time(), CountingConnection.round_trips
    for name, step in (
        ("provision", pool.provision),
        ("idle_stop", pool.idle_stop),
        ("sync", pool.sync),
    ):
        sw, sc, srt = time.perf_counter(), time.process_time(), CountingConnection.round_trips
        report = step()
        steps[name] = {
            "cpu_ms": 1000 * (time.process_time() - sc),
            "wall_ms": 1000 * (time.perf_counter() - sw),
            "round_trips": CountingConnection.round_trips - srt,
            "actions": {k: len(v) for k, v in report.actions.items()},
        }
    return {
        "kind": kind,
        "cpu_ms": 1000 * (time.process_time() - c0),
        "wall_ms": 1000 * (time.perf_counter() - w0),
        "round_trips": CountingConnection.round_trips - rt0,
        "provider_calls": dict(provider.calls),
        "provider_vms": dict(provider.vms),
        "steps": steps,
        "floor_cpu_ms": 1000 * floor_cpu,
        "floor_round_trips": floor_rt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="", help="pyinstrument HTML of one pass: PATH")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="migctl-recon-"))).start()
    result: dict[str, Any] = {"vms": args.vms, "kinds": {}}
    try:
        pool = redis.ConnectionPool.from_url(server.url, connection_class=CountingConnection)
        client = redis.Redis(connection_pool=pool)
        one_pass(client, args.vms, "scale-down")  # warm: imports, scripts loaded
        for kind in ("scale-down", "scale-up"):
            runs = [one_pass(client, args.vms, kind) for _ in range(args.repeats)]
            cpu = median(r["cpu_ms"] for r in runs)
            floor = median(r["floor_cpu_ms"] for r in runs)
            calls = runs[-1]["provider_calls"]
            batched = all(v <= 1 for v in calls.values())
            result["kinds"][kind] = {
                "runs": runs,
                "cpu_ms": cpu,
                "wall_ms": median(r["wall_ms"] for r in runs),
                "floor_cpu_ms": floor,
                "ratio": ratio(cpu, floor),
                "round_trips": runs[-1]["round_trips"],
                "provider_calls": calls,
                "provider_vms": runs[-1]["provider_vms"],
                "one_call_per_kind": batched,
                "steps": runs[-1]["steps"],
            }
        if args.profile:
            from pyinstrument import Profiler

            build(client, args.vms, "scale-down")
            store = RedisStore(client, POOL)
            p = Pool(
                store, CountingProvider(SimMig(client, POOL)), settings(args.vms), NullDispatch()
            )  # type: ignore[arg-type]
            prof = Profiler(interval=0.0002)
            with prof:
                p.provision()
                p.idle_stop()
                p.sync()
            Path(args.profile).write_text(prof.output_text(unicode=False, color=False))
    finally:
        server.stop()
    print(
        f"reconcile pass over {args.vms} VMs (provision + idle_stop + sync), "
        f"median of {args.repeats}"
    )
    for kind, k in result["kinds"].items():
        print(
            f"  {kind:>10}: CPU {k['cpu_ms']:.1f} ms (wall {k['wall_ms']:.1f} ms), "
            f"{k['round_trips']} Redis round trips; floor (read the pool once) "
            f"{k['floor_cpu_ms']:.1f} ms CPU -> {k['ratio']:.1f}x; target <= 50 ms: "
            f"{'PASS' if k['cpu_ms'] <= 50 else 'SHORT'}"
        )
        print(
            "              provider calls "
            + ", ".join(
                f"{c} x{n} ({k['provider_vms'].get(c, 0)} VMs)"
                for c, n in k["provider_calls"].items()
            )
            + f"; one batched call per kind: {'PASS' if k['one_call_per_kind'] else 'SHORT'}"
        )
        print(
            "              steps "
            + "; ".join(
                f"{name} {st['cpu_ms']:.1f} ms CPU / {st['round_trips']} RT {st['actions']}"
                for name, st in k["steps"].items()
            )
        )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
