"""Assignment cost on a warm pool: Redis round trips and commands per assignment, and
assignments/s through the service in one process, against a private redis-server.

    python bench/assign_bench.py --vms 1000 --jobs 2000

The floor, measured in the same run: raw PING round trips/s on the same connection.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis

from migctl.adapters.redis_store import RedisStore
from migctl.bridge.messages import JobEvent
from migctl.domain.model import AgentState, InfraStatus, Vm
from migctl.domain.transitions import Change
from migctl.ports import RunnerCredentials
from migctl.services.assignment import Assigner
from migctl.services.events import AgentEvents
from migctl.services.intake import RedisIntake
from migctl.settings import Settings
from migctl.sim.stack import RedisServer
from migctl.worker.dispatch import RecordingDispatcher

POOL = "bench"


class Tokens:
    def runner_credentials(self, scope, runner_name, labels, jit):
        return RunnerCredentials(
            runner_url="https://github.com/o",
            registration_token="x" * 29,
            expires_at=time.time() + 3600,
        )


class CountingConnection(redis.Connection):
    round_trips = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.round_trips += 1
        return super().send_packed_command(command, check_health)


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in client.info("commandstats").items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp())).start()
    try:
        pool = redis.ConnectionPool.from_url(server.url, connection_class=CountingConnection)
        client = redis.Redis(connection_pool=pool)
        settings = Settings(
            pool={"id": POOL},
            vm_manager={"provider": "sim", "max_vms": args.vms + 10},
            scheduler={"max_concurrent_assignments": args.jobs + 10},
            github_app={"app_id": "1", "private_key": "unused", "org": "o"},
            pubsub={"source": "local"},
        )
        store = RedisStore(client, POOL)
        dispatch = RecordingDispatcher()
        events = AgentEvents(store, settings, dispatch)
        intake = RedisIntake(store, settings, dispatch, events)
        assigner = Assigner(store, Tokens(), settings, dispatch)
        now = time.time()
        change = Change()
        for i in range(args.vms):
            change.vm(
                Vm(
                    id=f"vm-{i:05d}",
                    labels=("self-hosted", "linux", "x64"),
                    infra=InfraStatus.RUNNING,
                    agent=AgentState.READY,
                    connected=True,
                    last_active=now - i,
                )
            )
        store.save(change, {})
        n = min(args.jobs, args.vms)
        for i in range(n):
            intake.accept(
                JobEvent(
                    "queued",
                    str(10_000 + i),
                    "1",
                    ("self-hosted", "linux"),
                    "o",
                    "o/r",
                    1,
                    POOL,
                    0,
                    now,
                    "",
                    "",
                    "job_message",
                )
            )

        # Floor: raw round trips on the same client.
        t = time.perf_counter()
        for _ in range(5000):
            client.ping()
        ping_rate = 5000 / (time.perf_counter() - t)

        before, rt_before = commandstats(client), CountingConnection.round_trips
        t = time.perf_counter()
        results = [assigner.assign_job(str(10_000 + i)).result for i in range(n)]
        elapsed = time.perf_counter() - t
        after, rt_after = commandstats(client), CountingConnection.round_trips
        assert results.count("assigned") == n, {r: results.count(r) for r in set(results)}
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta = {k: v for k, v in delta.items() if v and k != "cmdstat_info"}
        commands = sum(delta.values())
        rate = n / elapsed
        print(f"warm pool {args.vms} VMs, {n} assignments in one process")
        print(f"  assignments/s            {rate:,.0f}")
        print(f"  round trips/assignment   {(rt_after - rt_before - 1) / n:.2f}")
        print(
            f"  Redis commands/assignment {commands / n:.2f}  ({', '.join(f'{k[8:]}={v / n:.2f}' for k, v in sorted(delta.items()))})"
        )
        print(
            f"  floor: PING round trips/s {ping_rate:,.0f}; assignment = {ping_rate / rate:.1f} round-trip times"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
