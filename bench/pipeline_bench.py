"""The assignment pipeline end to end, its Redis cost, and the processes' memory.

    python bench/pipeline_bench.py [--vms 1000] [--concurrency 1,2,4] [--quick] [--json OUT]

One private world per run: a redis-server (migctl.sim.stack.RedisServer), the fake
GitHub (registration tokens), a generated controller config (sim provider, local job
source), and real processes: the gateway (`migctl-grpc-gateway`), `--vms` light agents
holding real gRPC streams in their own process (bench/light_agents.py), the bridge's
handler in its own process (bench/feeder.py: `Handler.handle` on the real RedisIntake and
CeleryDispatcher), and `celery -A migctl worker` (prefork, `-c N`). The VMs are put
READY in the store (as bench/assign_bench.py does) and their agents connect for them.

Measured from handler entry to `register_runner` received by the agent:
1. sustained jobs/s with N = 1, 2, 4 worker processes (`-c N`): the bridge handler feeds
   `--vms` jobs back to back; jobs / (last receipt - first handler entry); median of 3.
   Floor: Celery no-op tasks/s drained by `celery -A bench.celery_floor worker -c N` (same
   app config, broker and queue) from a pre-filled queue; median of 3.
2. latency p50/p95/p99 at open-loop offered loads of 10, 100 and 500 jobs/s (arrivals
   due at t0 + i/rate, latency counted from the due time), with `-c 2`. Floor: send ->
   task start of a Celery task at 100/s on the floor worker.
3. Redis cost per assignment: commands (INFO commandstats delta, ours vs Celery's) and
   round trips (a probe in each product process counts redis-py requests, bench/probe),
   minus an idle window of the same length. Floor: Celery's own cost per no-op task.
4. RSS (psutil, process + children) of worker, bridge and gateway at rest and the peak
   under the sustained load. Floor: a bare interpreter that imported the same libraries
   (worker: the floor worker at the same -c).

Between runs every VM is put back READY (its agent keeps its stream).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BIN,
    LABELS,
    PYTHON,
    app_key,
    controller_config,
    cpu_s,
    import_floor_rss,
    median,
    pct,
    product_env,
    ratio,
    rss_mib,
    spawn,
    stop,
    wait_for,
    write_json,
)
from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import AgentState, InfraStatus, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.settings import load_settings
from migctl.sim.github import FakeGitHub
from migctl.sim.stack import RedisServer, free_port
from migctl.worker.queues import KINDS, queue

POOL = "bench"
STAMPS = "bench:floor:stamps"
FLOOR_QUEUE = "bench.floor"  # the floor worker's own queue: both workers run side by side


class Agents:
    """The light-agent process and what it reports."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.connected = 0
        self.ready = False
        self.recv: dict[str, list[tuple[str, float, int]]] = {}
        self.count = 0
        self.anomalies: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.decode().split()
            if not parts:
                continue
            kind = parts[0]
            if kind == "RECV":
                with self.lock:
                    self.recv.setdefault(parts[1], []).append(
                        (parts[2], float(parts[3]), int(parts[4]))
                    )
                    self.count += 1
            elif kind == "CONNECTED":
                self.connected = int(parts[1])
            elif kind == "READY":
                self.ready = True
            else:
                self.anomalies.append(" ".join(parts)[:200])

    def take(self) -> dict[str, list[tuple[str, float, int]]]:
        with self.lock:
            got, self.recv, self.count = self.recv, {}, 0
            return got


class Sampler:
    """Peak RSS of some processes while a load runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mib(pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss_mib(pid))


class World:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="migctl-pipeline-"))
        self.probe_dir = self.workdir / "probe"
        self.probe_dir.mkdir()
        self.server = RedisServer(self.workdir).start()
        self.r = redis.Redis.from_url(self.server.url)
        key_path, public_pem = app_key(self.workdir)
        self.github = FakeGitHub("424242", public_pem).start()
        self.grpc_port, self.http_port = free_port(), free_port()
        self.config = controller_config(
            self.workdir,
            self.server.url,
            POOL,
            github_url=self.github.url,
            key_path=key_path,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            extra={
                # In-flight registrations are an operator's GitHub budget, not what is
                # measured here: high enough never to defer an assignment.
                "scheduler.max_concurrent_assignments": args.vms + 10,
                "vm_manager.max_vms": args.vms + 10,
            },
        )
        self.env = product_env(self.config, self.probe_dir)
        if getattr(args, "probe_debug", False):
            self.env["BENCH_PROBE_DEBUG"] = "1"
        self.settings = load_settings(str(self.config))
        self.store = RedisStore(self.r, POOL)
        from migctl.worker.app import build_app

        self.app = build_app(self.settings)
        self.queues = [queue(POOL, kind) for kind in KINDS]
        self.assign_queue = queue(POOL, "assign")
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.next_job = 1_000_000
        self.vm_ids = [f"vm-{i:05d}" for i in range(args.vms)]

    # -- processes ---------------------------------------------------------------------------

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def seed_vms(self) -> None:
        now = time.time()
        for start in range(0, len(self.vm_ids), 500):
            change = Change()
            for i, vm_id in enumerate(self.vm_ids[start : start + 500], start):
                change.vm(
                    Vm(
                        id=vm_id,
                        labels=tuple(LABELS),
                        infra=InfraStatus.RUNNING,
                        agent=AgentState.READY,
                        connected=True,
                        created_at=now,
                        state_since=now,
                        last_heartbeat=now,
                        last_active=now - i,
                    )
                )
            self.store.save(change, {})

    def start_gateway(self) -> None:
        self.procs["gateway"] = spawn(
            [str(BIN / "migctl-grpc-gateway"), "--config", str(self.config)],
            self.env,
            self.log("gateway"),
        )
        import socket

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.grpc_port)) == 0

        wait_for(listening, "gateway gRPC port", 60)

    def start_agents(self) -> Agents:
        proc = spawn(
            [
                PYTHON,
                str(Path(__file__).parent / "light_agents.py"),
                "--target",
                f"127.0.0.1:{self.grpc_port}",
                "--pool",
                POOL,
                "--vms",
                str(self.args.vms),
            ],
            None,
            self.log("agents"),
            stdout=subprocess.PIPE,
        )
        self.procs["agents"] = proc
        self.agents = Agents(proc)
        wait_for(lambda: self.agents.ready, f"{self.args.vms} agent streams", 180)
        return self.agents

    def start_feeder(self) -> None:
        proc = spawn(
            [PYTHON, str(Path(__file__).parent / "feeder.py")],
            self.env,
            self.log("bridge"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.procs["bridge"] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("feeder died:\n" + self.log("bridge").read_text()[-2000:])

    def feed(self, n: int, rate: float = 0.0) -> dict[str, Any]:
        proc = self.procs["bridge"]
        assert proc.stdin is not None and proc.stdout is not None
        cmd = {"op": "open" if rate else "burst", "first": self.next_job, "n": n, "rate": rate}
        self.next_job += n
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()
        return self._feed_reply()

    def feed_async(self, n: int, rate: float = 0.0) -> None:
        proc = self.procs["bridge"]
        assert proc.stdin is not None
        cmd = {"op": "open" if rate else "burst", "first": self.next_job, "n": n, "rate": rate}
        self.next_job += n
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()

    def _feed_reply(self) -> dict[str, Any]:
        out = self.procs["bridge"].stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError("feeder died:\n" + self.log("bridge").read_text()[-2000:])
        return json.loads(line)

    def start_worker(self, name: str, concurrency: int, floor: bool = False) -> None:
        app = "bench.celery_floor" if floor else "migctl"
        args = [str(BIN / "celery"), "-A", app, "worker", "-E", "--loglevel", "WARNING"]
        args += ["-c", str(concurrency), "-n", f"{name}@bench", "--pool", "prefork"]
        if floor:
            args += ["-Q", FLOOR_QUEUE]
        self.procs[name] = spawn(args, self.env, self.log(name))

        def pinged() -> bool:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} died:\n" + self.log(name).read_text()[-3000:])
            return bool(self.app.control.ping(destination=[f"{name}@bench"], timeout=0.5))

        wait_for(pinged, f"worker {name}", 90, every=0.2)
        time.sleep(0.5)  # let the pool children settle (their first import work)

    def stop_proc(self, name: str) -> None:
        stop(self.procs.pop(name, None))

    def close(self) -> None:
        proc = self.procs.get("bridge")
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.write(b'{"op": "quit"}\n')
                proc.stdin.flush()
            except BrokenPipeError:
                pass
        for name in list(self.procs):
            self.stop_proc(name)
        self.github.stop()
        self.server.stop()

    # -- the state between runs --------------------------------------------------------------

    def quiet(self, timeout: float = 60) -> None:
        """Until no Celery message waits or runs and no registration is unacked."""
        inflight = self.store.k.inflight
        stable = 0

        def idle() -> bool:
            nonlocal stable
            pipe = self.r.pipeline(transaction=False)
            for q in self.queues:
                pipe.llen(q)
            pipe.hlen("unacked")
            pipe.zcard(inflight)
            busy = sum(pipe.execute())
            stable = stable + 1 if busy == 0 else 0
            return stable >= 4

        wait_for(idle, "quiet broker", timeout, every=0.05)
        time.sleep(0.3)  # the gateway's relay threads finish what they hold

    def reset_vms(self) -> None:
        """Every VM READY and free again, keeping its stream's session."""
        for _ in range(6):
            now = time.time()
            items = []
            for i, (vm, rev) in enumerate(self.store.get_vms(self.vm_ids)):
                new = vm.with_(
                    agent=AgentState.READY,
                    runner_registered=False,
                    reserved_job="",
                    reserved_at=0.0,
                    cmd_id="",
                    job_id="",
                    lifecycle=Lifecycle.NONE,
                    unhealthy=False,
                    last_active=now - i,
                )
                if new != vm:
                    items.append((Change(vms={vm.id: new}), {f"vm:{vm.id}": rev}))
            self.store.save_many(items)
            time.sleep(0.2)
            free = self.r.zcard(self.store.k.free)
            if free == len(self.vm_ids):
                return
        raise RuntimeError(f"only {free} of {len(self.vm_ids)} VMs free after reset")

    # -- measurements --------------------------------------------------------------------------

    def run_jobs(self, n: int, rate: float = 0.0, timeout: float = 120) -> dict[str, Any]:
        """Feed n jobs; wait for their register_runner at the agents; latencies."""
        self.agents.take()
        pids = {k: self.procs[k].pid for k in ("gateway", "agents", "bridge", "worker")}
        pids["redis"] = self.server.proc.pid  # type: ignore[union-attr]
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        wall0 = time.time()
        with Sampler({k: pids[k] for k in ("gateway", "bridge", "worker")}) as sampler:
            self.feed_async(n, rate)
            reply = self._feed_reply()
            try:
                wait_for(lambda: self.agents.count >= n, f"{n} registrations", timeout, 0.02)
            except TimeoutError:
                pass
        wall1 = time.time()
        cpu1 = {k: cpu_s(p) for k, p in pids.items()}
        recv = self.agents.take()
        rows = reply["rows"]
        jobs = dict((job.id, job.vm_id) for job, _ in self.store.get_jobs([row[0] for row in rows]))
        latencies, lags, bad = [], [], 0
        first_entry = min(row[2] for row in rows)
        last = first_entry
        for job_id, due, entry, _done in rows:
            lags.append(entry - due)
            got = recv.get(jobs.get(job_id, ""), [])
            if got:
                _cmd, at, b = got[0]
                bad += b
                latencies.append(at - due)
                last = max(last, at)
        received = sum(len(v) for v in recv.values())
        span = last - first_entry
        feed_span = max(row[3] for row in rows) - first_entry
        return {
            "jobs": n,
            "received": received,
            "matched": len(latencies),
            "bad_params": bad,
            "refused": reply["refused"][:5],
            "jobs_per_s": len(latencies) / span if span > 0 else 0.0,
            "feed_per_s": n / feed_span if feed_span > 0 else 0.0,
            "p50_ms": pct(latencies, 50) * 1000,
            "p95_ms": pct(latencies, 95) * 1000,
            "p99_ms": pct(latencies, 99) * 1000,
            "max_ms": max(latencies, default=float("nan")) * 1000,
            "feeder_lag_p99_ms": pct(lags, 99) * 1000,
            "cpu_pct": {k: 100 * (cpu1[k] - cpu0[k]) / (wall1 - wall0) for k in pids},
            "peak_rss_mib": dict(sampler.peak),
        }

    def noop_template(self) -> dict[str, Any]:
        """One bench.noop message as kombu writes it (captured on a queue nobody reads)."""
        scratch = "bench.template"
        self.r.delete(scratch)
        self.app.send_task("bench.noop", queue=scratch)
        raw = self.r.rpop(scratch)
        assert raw, "no message captured"
        message = json.loads(raw)
        assert message["headers"]["task"] == "bench.noop", message["headers"]["task"]
        return message

    def floor_drain(self, template: dict[str, Any], k: int) -> float:
        """Noop tasks/s: k copies pushed in one pipeline, until queue and unacked are empty."""
        msgs = []
        for _ in range(k):
            m = json.loads(json.dumps(template))
            tid = str(uuid.uuid4())
            m["headers"]["id"] = tid
            m["headers"]["root_id"] = tid
            m["properties"]["correlation_id"] = tid
            m["properties"]["delivery_tag"] = str(uuid.uuid4())
            msgs.append(json.dumps(m))
        t0 = time.perf_counter()
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, k, 500):
            pipe.lpush(FLOOR_QUEUE, *msgs[i : i + 500])
        pipe.execute()

        def drained() -> bool:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(FLOOR_QUEUE)
            pipe.hlen("unacked")
            return sum(pipe.execute()) == 0

        wait_for(drained, "floor drain", 120, every=0.005)
        return k / (time.perf_counter() - t0)

    def floor_latency(self, rate: float, seconds: float, repeats: int = 3) -> dict[str, Any]:
        """Celery's own send -> task start at `rate`, open loop; median of `repeats` runs."""
        runs = [self._floor_latency(rate, seconds) for _ in range(repeats)]
        out: dict[str, Any] = {k: median(r[k] for r in runs) for k in runs[0]}
        out["runs"] = runs
        return out

    def _floor_latency(self, rate: float, seconds: float) -> dict[str, float]:
        self.r.delete(STAMPS)
        n = int(rate * seconds)
        t0 = time.time() + 0.05
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            self.app.send_task("bench.stamp", args=[due], queue=FLOOR_QUEUE)
        wait_for(lambda: self.r.llen(STAMPS) >= n, "floor stamps", 60)
        lat = [float(x) for x in self.r.lrange(STAMPS, 0, -1)]
        return {
            "p50_ms": pct(lat, 50) * 1000,
            "p95_ms": pct(lat, 95) * 1000,
            "p99_ms": pct(lat, 99) * 1000,
        }

    # -- Redis cost ----------------------------------------------------------------------------

    def _probe(self) -> dict[int, dict[str, int]]:
        out = {}
        for f in self.probe_dir.glob("*.json"):
            try:
                out[int(f.stem)] = json.loads(f.read_text())
            except (ValueError, OSError):
                pass
        return out

    def _roles(self) -> dict[int, str]:
        import psutil

        roles = {}
        for name in ("gateway", "bridge", "worker", "floor"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                continue
            roles[root.pid] = name
            for child in root.children(recursive=True):
                roles[child.pid] = name
        return roles

    def _snapshot(self) -> tuple[dict[str, int], dict[int, dict[str, int]], int]:
        info = self.r.info("commandstats")
        stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()}
        reads = int(self.r.info("stats")["total_reads_processed"])
        return stats, self._probe(), reads

    def _window(self, work: Any) -> dict[str, Any]:
        """Counts during `work()` (plus settling), by role and owner."""
        time.sleep(0.4)
        s0, p0, reads0 = self._snapshot()
        t0 = time.time()
        work()
        self.quiet()
        time.sleep(0.4)
        s1, p1, reads1 = self._snapshot()
        elapsed = time.time() - t0
        roles = self._roles()
        by: dict[str, dict[str, int]] = {}
        for pid, counts in p1.items():
            base = p0.get(pid, dict.fromkeys(counts, 0))
            role = roles.get(pid, "other")
            acc = by.setdefault(role, {})
            for key, value in counts.items():
                acc[key] = acc.get(key, 0) + value - base.get(key, 0)
        stats = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
        stats = {k: v for k, v in stats.items() if v and k not in ("info",)}
        return {"elapsed": elapsed, "by_role": by, "commandstats": stats, "reads": reads1 - reads0}

    def redis_cost(self, n: int, rate: float, work: Any = None) -> dict[str, Any]:
        """Counts of a busy window (n jobs at `rate`, or `work()`), minus those of idle
        windows of the same length before and after it (the periodic work: heartbeat
        flushes, outbox sweeps, Celery's heartbeats and BRPOP timeouts)."""
        (self.probe_dir / "active").touch()
        try:
            time.sleep(0.3)
            length = n / rate + 1.5
            before = self._window(lambda: time.sleep(length))
            busy = self._window(work or (lambda: self.run_jobs(n, rate)))
            after = self._window(lambda: time.sleep(busy["elapsed"]))
        finally:
            (self.probe_dir / "active").unlink()
        return {"busy": busy, "idle": _merge(before, after), "jobs": n}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    def add(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        return {k: x.get(k, 0) + y.get(k, 0) for k in set(x) | set(y)}

    roles = {
        r: add(a["by_role"].get(r, {}), b["by_role"].get(r, {}))
        for r in set(a["by_role"]) | set(b["by_role"])
    }
    return {
        "elapsed": a["elapsed"] + b["elapsed"],
        "by_role": roles,
        "commandstats": add(a["commandstats"], b["commandstats"]),
        "reads": a["reads"] + b["reads"],
    }


def per_job(cost: dict[str, Any]) -> dict[str, Any]:
    """Busy minus idle, per assignment, by role and owner; commandstats too."""
    n = cost["jobs"]
    busy, idle = cost["busy"], cost["idle"]
    scale = busy["elapsed"] / idle["elapsed"] if idle["elapsed"] else 1.0
    roles: dict[str, dict[str, float]] = {}
    for role in set(busy["by_role"]) | set(idle["by_role"]):
        b, i = busy["by_role"].get(role, {}), idle["by_role"].get(role, {})
        values = {k: (b.get(k, 0) - i.get(k, 0) * scale) / n for k in set(b) | set(i)}
        roles[role] = {k: v for k, v in values.items() if ":" not in k or abs(v) >= 0.05}
    stats = {
        k: (busy["commandstats"].get(k, 0) - idle["commandstats"].get(k, 0) * scale) / n
        for k in set(busy["commandstats"]) | set(idle["commandstats"])
    }
    stats = {k: v for k, v in stats.items() if abs(v) >= 0.005}
    total = sum(stats.values())
    client_cmds = sum(r["ours_cmds"] + r["celery_cmds"] for r in roles.values())
    return {
        "roles": roles,
        "commandstats": dict(sorted(stats.items())),
        "server_commands": total,
        "client_commands": client_cmds,
        "script_commands": total - client_cmds,
        "reads": (busy["reads"] - idle["reads"] * scale) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor-tasks", type=int, default=1500)
    parser.add_argument("--sustained-jobs", type=int, default=600)
    parser.add_argument("--loads", default="10:10,100:10,500:2", help="rate:seconds,...")
    parser.add_argument("--latency-concurrency", type=int, default=2)
    parser.add_argument("--cost-jobs", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="1 repeat, shorter loads")
    parser.add_argument("--profile", default="", help="py-spy the worker during one run: DIR")
    parser.add_argument("--profile-idle", action="store_true", help="py-spy wall time too")
    parser.add_argument("--probe-debug", action="store_true", help="log probed requests")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
        args.loads = "10:5,100:5,500:2"
    levels = [int(x) for x in args.concurrency.split(",") if x]
    args.sustained_jobs = min(args.sustained_jobs, args.vms)
    loads = [(float(a), float(b)) for a, b in (x.split(":") for x in args.loads.split(","))]

    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the world
    world = World(args)
    result: dict[str, Any] = {
        "vms": args.vms,
        "levels": {},
        "latency": {},
        "latency_concurrency": args.latency_concurrency,
        "sustained_jobs": args.sustained_jobs,
    }
    try:
        world.seed_vms()
        world.start_gateway()
        world.start_agents()
        world.start_feeder()
        print(
            f"pipeline: {args.vms} READY VMs, agents connected over gRPC in their own process; "
            f"world up in {time.time() - started:.0f}s ({world.workdir})",
            flush=True,
        )
        template = world.noop_template()
        rest: dict[str, float] = {
            "gateway": rss_mib(world.procs["gateway"].pid),
            "bridge": rss_mib(world.procs["bridge"].pid),
        }
        for c in levels:
            level: dict[str, Any] = {}
            # The floor worker (Celery no-op tasks, same app config, its own queue) and the
            # pipeline's `celery -A migctl worker`, both -c c, side by side; each is idle
            # while the other is measured, and the repeats alternate, so each ratio pairs
            # two figures taken seconds apart on this shared machine.
            world.start_worker("floor", c, floor=True)
            world.start_worker("worker", c)
            level["floor_rss_mib"] = rss_mib(world.procs["floor"].pid)
            level["worker_rss_rest_mib"] = rss_mib(world.procs["worker"].pid)
            world.floor_drain(template, 200)  # warm both pools
            world.reset_vms()
            warm = world.run_jobs(min(50, args.vms), rate=100)
            world.quiet()
            floors, runs = [], []
            for i in range(args.repeats):
                floors.append(world.floor_drain(template, args.floor_tasks))
                world.reset_vms()
                if args.profile and c == args.latency_concurrency and i == 0:
                    runs.append(profiled(world, args, args.sustained_jobs))
                else:
                    runs.append(world.run_jobs(args.sustained_jobs))
                world.quiet()
            level["warmup_received"] = warm["received"]
            level["floor_tasks_per_s"] = floors
            level["runs"] = runs
            level["ratios"] = [ratio(r["jobs_per_s"], f) for r, f in zip(runs, floors, strict=True)]
            level["jobs_per_s"] = median(r["jobs_per_s"] for r in runs)
            level["floor"] = median(floors)
            level["ratio"] = median(level["ratios"])
            print(
                f"  -c {c}: {level['jobs_per_s']:,.0f} jobs/s (runs "
                + ", ".join(f"{r['jobs_per_s']:,.0f}" for r in runs)
                + f"; bridge fed {median(r['feed_per_s'] for r in runs):,.0f}/s); "
                f"floor {level['floor']:,.0f} no-op tasks/s (runs "
                + ", ".join(f"{f:,.0f}" for f in floors)
                + f"); ratio {level['ratio']:.2f}",
                flush=True,
            )
            if c == args.latency_concurrency:
                result["latency_floor"] = world.floor_latency(100, 2, 1 if args.quick else 3)
                for rate, seconds in loads:
                    n = min(int(rate * seconds), args.vms)
                    world.reset_vms()
                    run = world.run_jobs(n, rate=rate, timeout=max(120, 3 * n / rate))
                    world.quiet()
                    result["latency"][f"{rate:g}"] = run
                    print(
                        f"  open loop {rate:g} jobs/s x {n}: p50 {run['p50_ms']:.1f} ms, "
                        f"p95 {run['p95_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms "
                        f"({run['matched']}/{n} received; feeder lag p99 "
                        f"{run['feeder_lag_p99_ms']:.1f} ms)",
                        flush=True,
                    )
                world.reset_vms()
                cost = world.redis_cost(min(args.cost_jobs, args.vms), 100)
                result["redis_cost"] = per_job(cost)
                result["redis_cost_raw"] = cost
                # Celery's own cost per no-op task, probed the same way.
                k = 1000
                floor_cost = world.redis_cost(
                    k, 1000.0, lambda t=template, k=k: world.floor_drain(t, k)
                )
                result["redis_cost_floor"] = per_job(floor_cost)
            world.stop_proc("worker")
            world.stop_proc("floor")
            result["levels"][str(c)] = level
        rest["worker"] = result["levels"][str(args.latency_concurrency)]["worker_rss_rest_mib"]
        result["rss_rest_mib"] = rest
        result["rss_floor_mib"] = {
            "worker": result["levels"][str(args.latency_concurrency)]["floor_rss_mib"],
            "gateway": import_floor_rss(["grpc", "grpc.aio", "redis.asyncio", "celery", "kombu"]),
            "bridge": import_floor_rss(
                ["celery", "kombu", "redis", "pydantic", "google.cloud.pubsub_v1"]
            ),
        }
        result["agent_anomalies"] = world.agents.anomalies[:20]
    finally:
        world.close()
    result["elapsed_s"] = time.time() - started
    report(result, args)
    write_json(args.json, result)


def profiled(world: World, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """One sustained run with py-spy recording every worker process."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    spy = BIN / "py-spy"
    procs = []
    for name in ("worker", "gateway", "bridge"):
        procs.append(
            subprocess.Popen(
                [str(spy), "record", "-p", str(world.procs[name].pid), "-s", "-r", "200",
                 *(["--idle"] if args.profile_idle else []),
                 "-f", "speedscope", "-o", str(out / f"{name}.json"), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    time.sleep(1.0)
    try:
        return world.run_jobs(n)
    finally:
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait(30)


def per_task(counts: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Round trips made inside each Celery task, per job: (ours, Celery)."""
    out: dict[str, list[float]] = {}
    for key, value in counts.items():
        if key.startswith("task:"):
            _, name, owner = key.rsplit(":", 2) if key.count(":") >= 2 else (key, "", "")
            slot = out.setdefault(name.removeprefix("migctl."), [0.0, 0.0])
            slot[0 if owner == "ours" else 1] += value
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def named(counts: dict[str, float], owner: str) -> str:
    """Round trips by first command (`+` = a pipeline), largest first."""
    items = sorted(
        ((k.split(":", 1)[1], v) for k, v in counts.items() if k.startswith(owner + ":")),
        key=lambda kv: -kv[1],
    )
    return ", ".join(f"{k} {v:.2f}" for k, v in items if abs(v) >= 0.05) or "-"


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print("\nassignment pipeline (handler entry -> register_runner at the agent)")
    print(f"{'worker processes':>18} {'jobs/s':>9} {'floor no-op/s':>14} {'ratio':>7}")
    for c, level in result["levels"].items():
        print(
            f"{c:>18} {level['jobs_per_s']:>9,.0f} {level['floor']:>14,.0f} {level['ratio']:>7.2f}"
        )
    lf = result.get("latency_floor", {})
    print(
        f"latency (open loop, -c {args.latency_concurrency}); floor: Celery send->start at 100/s "
        f"p50 {lf.get('p50_ms', float('nan')):.1f} ms, p99 {lf.get('p99_ms', float('nan')):.1f} ms"
    )
    for rate, run in result["latency"].items():
        print(
            f"  {rate:>5} jobs/s: p50 {run['p50_ms']:7.1f}  p95 {run['p95_ms']:7.1f}  "
            f"p99 {run['p99_ms']:7.1f} ms  ({run['matched']}/{run['jobs']})"
        )
    cost = result.get("redis_cost")
    if cost:
        print("Redis per assignment (busy minus idle window)")
        for role, c in sorted(cost["roles"].items()):
            if max(abs(c["ours_rt"]), abs(c["celery_rt"])) < 0.05:
                continue
            print(
                f"  {role:>8}: ours {c['ours_rt']:.2f} round trips / {c['ours_cmds']:.2f} commands;"
                f" Celery {c['celery_rt']:.2f} / {c['celery_cmds']:.2f}"
            )
            print(f"{'':12}ours: {named(c, 'ours')}")
            print(f"{'':12}Celery: {named(c, 'celery')}")
            tasks = per_task(c)
            if tasks:
                print(
                    f"{'':12}inside tasks (ours/Celery round trips per job): "
                    + ", ".join(f"{t} {o:.2f}/{g:.2f}" for t, (o, g) in tasks.items())
                )
        floor = result.get("redis_cost_floor", {}).get("roles", {}).get("floor")
        if floor:
            print(
                f"  floor: Celery's own per no-op task: {floor['celery_rt']:.2f} round trips / "
                f"{floor['celery_cmds']:.2f} commands ({named(floor, 'celery')})"
            )
        print(
            f"  server-side commands {cost['server_commands']:.1f} (inside our scripts "
            f"{cost['script_commands']:.1f}); socket reads {cost['reads']:.1f}"
        )
    print("RSS MiB: at rest / peak under load / floor")
    for name in ("worker", "bridge", "gateway"):
        peak = max(
            (
                r["peak_rss_mib"].get(name, 0)
                for lv in result["levels"].values()
                for r in lv["runs"]
            ),
            default=0,
        )
        print(
            f"  {name:>8}: {result['rss_rest_mib'][name]:.0f} / {peak:.0f} / "
            f"{result['rss_floor_mib'][name]:.0f}"
        )
    print(f"pipeline bench took {result['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
