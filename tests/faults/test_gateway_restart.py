"""Restart the gateway five times (kill -9 and SIGTERM) while jobs flow, and kill agents:
every job still ends exactly once, VMs whose agent died for good are replaced, and
1,000 agents reconnecting at once to a restarted gateway are all admitted again.

Figures (recovery and reconnect times, job counts, faults) are printed, never asserted:
this machine is shared. `pytest -s` shows them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import InfraStatus, Lifecycle, Vm
from migctl.domain.transitions import Change
from migctl.gateway.testing import DeployedLikeAgent, GatewayProcess
from migctl.sim.mig import SimMig
from migctl.sim.stack import LABELS, POOL, LocalStack, StackOptions
from tests.faults.checks import check_exactly_once, check_no_orphans, wait_all_terminal
from tests.helpers import require, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# kill -9 first (nothing recorded: the new gateway must take over stale sessions), then
# alternate with a graceful SIGTERM (every stream ended, disconnects recorded).
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)


def session_gateway(session: str) -> str:
    """The gateway id a session id starts with (`<gateway id>-<random>`)."""
    return session.split("-", 1)[0]


# -- scenario 3a: a small pool, jobs flowing --------------------------------------------------


class FleetHandle:
    """Calls into the simulated fleet, which runs on its own event loop in its own thread."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def call(self, fn: Callable[[Any], Any]) -> Any:
        loop = self.stack._fleet_loop
        assert loop is not None and self.stack.fleet is not None
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(self.stack.fleet))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def living(self) -> set[str]:
        """VMs whose agent still runs (one that ended for good stays listed by the fleet)."""
        living: set[str] = self.call(
            lambda fleet: {n for n, a in fleet.agents.items() if not a.finished}
        )
        return living

    def kill_streams(self, n: int, rng: random.Random) -> list[str]:
        """Cut `n` agents' streams abruptly, agents mid-job first: each reconnects after
        its backoff, with its runner (and job) still going, as on a real VM."""

        def pick(fleet: Any) -> list[str]:
            up = [a for a in fleet.agents.values() if a.connected and not a.finished]
            rng.shuffle(up)
            up.sort(key=lambda a: a.current_job is None)
            out = []
            for agent in up[:n]:
                job = agent.current_job["job_id"] if agent.current_job else ""
                agent.kill()
                out.append(f"{agent.vm_id}(job {job})" if job else agent.vm_id)
            return out

        return list(self.call(pick))

    def kill_for_good(self, busy: bool) -> tuple[str, str] | None:
        """The agent process of one VM dies and never comes back (the VM stays RUNNING):
        no half-close, no more heartbeats, its runner stops talking to GitHub. `busy`:
        one running a job with at least 3 s left. Returns (vm_id, job_id) or None."""

        def pick(fleet: Any) -> tuple[str, str] | None:
            for agent in fleet.agents.values():
                if agent.finished or not agent.connected:
                    continue
                job = agent.current_job
                if busy:
                    left = job and job["started_at"] + float(job.get("duration", 0)) - time.time()
                    if not job or left < 3:
                        continue
                elif job is not None:
                    continue
                agent.die("killed for good by the test")
                return agent.vm_id, str(job["job_id"]) if job else ""
            return None

        got: tuple[str, str] | None = self.call(pick)
        return got


def recovery(store: RedisStore, mig: SimMig, fleet: FleetHandle, old: set[str]) -> tuple[str, int]:
    """Until every RUNNING VM with a living agent is connected through one new gateway:
    its record says connected, with a session of a gateway not in `old`. Returns the new
    gateway's id and how many VMs that was."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        running = {vm.name for vm in mig.list() if vm.status is InfraStatus.RUNNING}
        want = running & fleet.living()
        records = {vm.id: vm for vm, _ in store.get_vms(sorted(want))}
        new = set()
        for vm_id in want:
            vm = records.get(vm_id)
            if vm is None or not vm.connected or session_gateway(vm.session) in old:
                return False
            new.add(session_gateway(vm.session))
        seen.update(ids=new, n=len(want))
        return bool(want)

    wait_until(done, "every running VM's agent connected through the new gateway", 90, 0.05)
    assert len(seen["ids"]) == 1, f"VMs connected through several gateways: {seen['ids']}"
    return next(iter(seen["ids"])), int(seen["n"])


def gateway_ids(store: RedisStore) -> set[str]:
    """Every gateway id Redis knows of: published ones and those of recorded sessions."""
    ids = {_text(k) for k in store.r.hkeys(store.k.prefix + "gateways:seen")}
    ids |= {session_gateway(vm.session) for vm, _ in store.get_vms() if vm.session}
    return ids


def test_jobs_survive_five_gateway_restarts(tmp_path: Path) -> None:
    rng = random.Random(20260315)
    stack = LocalStack(
        StackOptions(
            use_emulator=False,
            processes=("bridge", "worker", "beat", "gateway"),
            min_ready_vms=2,
            max_vms=8,
            job_duration=0.5,
            create_s=1.0,
            # GitHub fails the job of a runner silent this long (its machine died).
            lost_runner_timeout=5.0,
            log_level="info",
            extra={
                "scheduler.assignment_timeout": "20s",
                # Removes the offline runner a dead agent leaves behind, once its VM is gone.
                "github_app.hygiene_interval": "10s",
            },
        ),
        workdir=tmp_path,
    )
    try:
        stack.start()
        assert stack.github is not None
        store = RedisStore(stack.redis, POOL)
        mig = SimMig(stack.mig_redis, POOL)
        fleet = FleetHandle(stack)
        wait_until(
            lambda: sum(vm.state.value == "READY" for vm, _ in store.get_vms()) >= 2,
            "2 READY VMs",
            90,
        )
        ids: list[str] = []
        faults: Counter[str] = Counter()
        dead: dict[str, str] = {}  # vm_id whose agent died for good -> its job then ("")
        for round_, sig in enumerate(SIGNALS):
            ids += stack.submit(4)
            ids += stack.submit(2, duration=6.0)  # long enough to die in the middle of
            time.sleep(1.5)
            if round_ in (1, 3):
                busy = round_ == 1
                got = None
                deadline = time.monotonic() + 20
                while got is None and time.monotonic() < deadline:
                    got = fleet.kill_for_good(busy)
                    if got is None:
                        time.sleep(0.2)
                assert got is not None, f"no {'busy' if busy else 'idle'} agent to kill"
                dead[got[0]] = got[1]
                faults["agent_deaths_mid_job" if busy else "agent_deaths_idle"] += 1
                print(f"round {round_}: agent of {got[0]} died for good (job {got[1] or '-'})")
            # Restart the gateway; the clock runs from the new process's start.
            old = gateway_ids(store)
            signalled = time.monotonic()
            stack.stop_process("gateway", sig)
            stopped = time.monotonic()
            code = stack.procs["gateway"].returncode
            if sig == signal.SIGTERM:
                assert code == 0, f"gateway did not stop gracefully: exit {code}\n" + (
                    stack.log_tail("gateway")
                )
            stack._spawn("gateway", "gateway")
            spawned = time.monotonic()
            faults["gateway_sigkill" if sig == signal.SIGKILL else "gateway_sigterm"] += 1
            gw_id, n_vms = recovery(store, mig, fleet, old)
            back = time.monotonic()
            done = Counter(job.state.value for job, _ in store.get_jobs(ids))
            print(
                f"restart {round_ + 1} ({signal.Signals(sig).name}): stop took "
                f"{stopped - signalled:.1f}s; all {n_vms} running VMs' agents connected "
                f"through gateway {gw_id} {back - spawned:.1f}s after its start "
                f"({back - signalled:.1f}s after the signal); jobs so far {dict(done)}"
            )
            cut = fleet.kill_streams(2, rng)
            faults["agent_stream_kills"] += len(cut)
            print(f"round {round_}: cut the streams of {', '.join(cut)}")
        ids += stack.submit(6)

        # VMs whose agent died are found silent by the health sweep and replaced.
        def replaced() -> bool:
            running = {vm.name for vm in mig.list() if vm.status is InfraStatus.RUNNING}
            records = {vm.id: vm for vm, _ in store.get_vms(sorted(dead))}
            return all(
                vm_id not in running
                and (vm_id not in records or records[vm_id].lifecycle is Lifecycle.DELETING)
                for vm_id in dead
            )

        wait_until(replaced, f"the VMs of dead agents {sorted(dead)} replaced", 180, 0.5)
        wait_all_terminal(stack, store, ids, 240)

        # A job whose runner died with its VM's agent is failed by GitHub ("the runner
        # lost communication") before the VM, silent but holding it, is replaced: our
        # record is COMPLETED once, with GitHub's conclusion `failure`, on that VM, so
        # check_exactly_once covers it as any other job (state, one runner, no overlap,
        # bound to the VM GitHub ran it on, counted once); here, that only such jobs
        # failed. (A runner that was waiting for a job when its agent died may have been
        # handed one by its last long-poll: that job is lost the same way.)
        gh = {j["job_id"]: j for j in stack.github.jobs()}
        jobs = {job.id: job for job, _ in store.get_jobs(ids)}
        lost = sorted(i for i in ids if gh[i]["conclusion"] != "success")
        for job_id in lost:
            assert gh[job_id]["runner_name"] in dead, (job_id, gh[job_id])
            assert gh[job_id]["conclusion"] == "failure", gh[job_id]
            assert jobs[job_id].conclusion == "failure", jobs[job_id]
        for vm_id, job_id in dead.items():
            assert not job_id or job_id in lost, f"job {job_id} of dead {vm_id}"
        assert all(jobs[i].conclusion == "success" for i in ids if i not in lost)
        assert stack.github.lost_runners == len(lost), stack.github.lost_runners
        counters = check_exactly_once(stack, ids)
        assert counters.get("replaced_vms", 0) >= len(dead), counters
        world = check_no_orphans(stack)
        print(
            f"{len(ids)} jobs: {len(ids) - len(lost)} succeeded, {len(lost)} failed by GitHub "
            f"with their dead runner ({', '.join(lost) or '-'}); settled world {world}"
        )
        print(f"faults injected: {dict(faults)}")
        keys = ("requeued_jobs", "replaced_vms", "assignment_timeouts", "commands_expired")
        print("counters: " + ", ".join(f"{k} {counters.get(k, 0)}" for k in keys))
    finally:
        stack.stop()


# -- scenario 3b: 1,000 agents reconnecting at once -------------------------------------------

AGENTS = 1000
POOL_B = "pool-reconnect"


class LightAgents:
    """bench/light_agents.py --reconnect in its own process, its report read as it comes."""

    def __init__(self, target: str, log: Path) -> None:
        self.log = log
        self._stderr = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "light_agents.py"),
                "--target",
                target,
                "--pool",
                POOL_B,
                "--vms",
                str(AGENTS),
                "--prefix",
                "vm-",
                "--channels",
                "20",
                "--reconnect",
                "--backoff-base",
                "0.5",
                "--backoff-cap",
                "5",
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.lock = threading.Lock()
        self.connected = 0  # streams open now, as the agents see them
        self.sessions = 0  # streams accepted so far
        self.lines: Counter[str] = Counter()  # report lines by kind
        self.refused: list[str] = []
        self.history: list[tuple[float, int]] = []  # (monotonic, streams open) as reported
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.decode(errors="replace").split()
            if not parts:
                continue
            with self.lock:
                self.lines[parts[0]] += 1
                if parts[0] == "CONNECTED":
                    self.connected = int(parts[1])
                    self.history.append((time.monotonic(), self.connected))
                elif parts[0] == "SESSIONS":
                    self.sessions = int(parts[1])
                elif parts[0] == "REFUSED":
                    self.refused.append(" ".join(parts)[:200])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def seed_vms(store: RedisStore, vm_ids: list[str]) -> None:
    """Running VMs of the pool, as the GCloud sync records them: the gateway admits an
    agent only for a VM it knows."""
    now = time.time()
    for start in range(0, len(vm_ids), 500):
        change = Change()
        for vm_id in vm_ids[start : start + 500]:
            change.vm(
                Vm(
                    id=vm_id,
                    labels=tuple(LABELS),
                    infra=InfraStatus.RUNNING,
                    created_at=now,
                    state_since=now,
                )
            )
        store.save(change, {})


def gateway_stats(store: RedisStore, gateway_id: str) -> dict[str, str]:
    raw = store.r.hgetall(f"{store.k.prefix}gateway:{gateway_id}")
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def published_since(store: RedisStore, since: float) -> str:
    """The id of a gateway that started after `since` (wall clock) and published."""
    for key in store.r.hkeys(store.k.prefix + "gateways:seen"):
        gw_id = _text(key)
        started = gateway_stats(store, gw_id).get("started_at")
        if started and float(started) >= since:
            return gw_id
    return ""


async def refused_stranger(target: str) -> bool:
    """A VM this pool does not know is still refused (connect_ack accepted=false)."""
    agent = DeployedLikeAgent(target, "vm-stranger", POOL_B)
    try:
        ack = await agent.connect(timeout=10)
        return ack is not None and not ack.accepted
    finally:
        await agent.drop()


def restart(
    gateway: GatewayProcess, light: LightAgents, store: RedisStore, vm_ids: list[str], sig: int
) -> tuple[float, str]:
    """Stop the gateway with `sig`, start a new one, wait for every agent to be back and
    check the new gateway's view. Returns the reconnect time (from the new process's
    start) and the new gateway's id."""
    sessions_before = light.sessions
    signalled = time.monotonic()
    code = gateway.stop_with(sig)
    stopped = time.monotonic()
    if sig == signal.SIGTERM:
        assert code == 0, f"gateway did not stop gracefully: exit {code}\n{gateway.tail(200)}"
    # Every agent has seen its stream end before the new gateway starts.
    wait_until(lambda: light.connected == 0, "every agent saw its stream end", 60)
    since = time.time()
    gateway.start()
    spawned = time.monotonic()
    wait_until(gateway.listening, "the new gateway listening", 60, 0.02)
    listening = time.monotonic()
    wait_until(lambda: light.connected == AGENTS, f"{AGENTS} agents back", 120, 0.05)
    back = time.monotonic()
    with light.lock:
        ramp = [(at, n) for at, n in light.history if at >= spawned]

    def reached(share: float) -> float:
        return next(at for at, n in ramp if n >= share * AGENTS) - spawned

    assert gateway.alive(), gateway.tail()
    health = requests.get(f"http://127.0.0.1:{gateway.http_port}/health", timeout=10)
    assert health.status_code == 200, health.text
    # The gateway's own view (published each second): one session per VM.
    gw_id: str = wait_until(lambda: published_since(store, since), "stats published", 30)
    stats: dict[str, str] = {}

    def settled() -> bool:
        stats.update(gateway_stats(store, gw_id))
        return stats.get("sessions") == str(AGENTS) and int(stats["accepted"]) >= AGENTS

    wait_until(settled, f"gateway {gw_id} publishing {AGENTS} sessions", 30)
    records = [vm for vm, _ in store.get_vms(vm_ids)]
    assert len(records) == AGENTS
    stale = [vm.id for vm in records if not vm.connected]
    assert not stale, f"{len(stale)} VMs not connected, e.g. {stale[:5]}"
    elsewhere = [vm.id for vm in records if session_gateway(vm.session) != gw_id]
    assert not elsewhere, f"{len(elsewhere)} sessions not of {gw_id}: {elsewhere[:5]}"
    assert len({vm.session for vm in records}) == AGENTS  # one session per VM
    assert stats.get("refused") == "0", stats
    assert not light.refused, light.refused[:5]
    # The seed's connected_vms counts live replicas only: a killed one drops out once it
    # stops publishing, so the figure settles on the streams really held.
    url = f"http://127.0.0.1:{gateway.http_port}/stats"
    connected_vms = wait_until(
        lambda: (n := requests.get(url, timeout=10).json()["connected_vms"]) == AGENTS and n,
        f"/stats connected_vms == {AGENTS}",
        30,
        0.5,
    )
    print(
        f"restart ({signal.Signals(sig).name}): stop took {stopped - signalled:.1f}s; "
        f"new gateway listening after {listening - spawned:.1f}s; "
        f"10%/50%/90% of the agents back after {reached(0.1):.1f}/{reached(0.5):.1f}/"
        f"{reached(0.9):.1f}s; all {AGENTS} back {back - spawned:.1f}s after its start "
        f"({back - signalled:.1f}s after the signal); sessions opened "
        f"{light.sessions - sessions_before}; gateway {gw_id}: accepted "
        f"{stats.get('accepted')}, replaced {stats.get('replaced')}, refused "
        f"{stats.get('refused')}; /stats connected_vms {connected_vms}"
    )
    return back - spawned, gw_id


def test_thousand_agents_reconnect_at_once(tmp_path: Path, redis_url: str) -> None:
    require((BIN / "migctl-grpc-gateway").exists(), "the migctl-grpc-gateway entry point")
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, POOL_B)
    vm_ids = [f"vm-{i:05d}" for i in range(AGENTS)]
    seed_vms(store, vm_ids)
    gateway = GatewayProcess(tmp_path, redis_url, pool_id=POOL_B, labels=LABELS)
    light: LightAgents | None = None
    try:
        gateway.start()
        started = time.monotonic()
        agents = light = LightAgents(gateway.target, tmp_path / "agents.log")
        wait_until(lambda: agents.connected == AGENTS, f"{AGENTS} agents connected", 120)
        print(f"{AGENTS} agents connected {time.monotonic() - started:.1f}s after the start")
        figures = []
        gw_id = ""
        for sig in SIGNALS:
            took, gw_id = restart(gateway, agents, store, vm_ids, sig)
            figures.append(took)
        # Admission still refuses what it must: a VM the pool does not know.
        assert asyncio.run(refused_stranger(gateway.target))
        wait_until(
            lambda: gateway_stats(store, gw_id).get("refused:unknown_vm") == "1",
            "the stranger counted as refused",
            10,
        )
        with agents.lock:
            lines = dict(agents.lines)
        print(f"reconnect after each restart: {', '.join(f'{s:.1f}s' for s in figures)}")
        print(f"agent report lines: {json.dumps(lines, sort_keys=True)}")
        assert gateway.alive(), gateway.tail()
        assert not re.search(r"Traceback", gateway.log.read_text(errors="replace")), gateway.tail()
    finally:
        if light is not None:
            light.stop()
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.stop_with(signal.SIGTERM)
        client.close()
