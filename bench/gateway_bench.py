"""The gateway under a fleet: N agent streams from a separate process, over ~100 channels.

    python bench/gateway_bench.py --streams 10000

Three processes per run, on a private redis-server: the server under test, the agents,
and this one (which enqueues commands as a worker does and samples the numbers).
Reported for the gateway and, as the floor, for a bare grpc.aio server in the same run
(connect_ack, count heartbeats, relay Redis pub/sub payloads to the streams: the
pattern of FACTS F.3 with nothing else):

- RSS of the server process with every stream open;
- relay latency p50/p99: worker enqueue into the outbox + publish -> agent receives
  (floor: PUBLISH -> agent receives), with every agent beating at the deployed agents'
  period (15 s: ~667 heartbeats/s for 10,000 VMs) and acking each command;
- then the agents beat as fast as `--burst` says: heartbeats/s ingested (and, for the
  gateway, VM records written to Redis), and the server's CPU, at that offered load.
On a 2-core machine the agents' process saturates first; both servers face the same one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from migctl.adapters.redis_store import RedisStore  # noqa: E402
from migctl.domain.model import InfraStatus, Vm  # noqa: E402
from migctl.domain.transitions import Change  # noqa: E402
from migctl.gateway.testing import DEPLOYED_OPTIONS  # noqa: E402
from migctl.sim.stack import RedisServer, free_port  # noqa: E402
from migctl.wire.miglet import commands_pb2 as pb  # noqa: E402
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc  # noqa: E402

POOL = "bench"
FLOOR_CHANNEL = "bench:floor:relay"


def vm_id(i: int) -> str:
    return f"vm-{i:05d}"


# -- the servers -------------------------------------------------------------------------------


async def run_gateway(redis_url: str, port: int) -> None:
    from migctl.gateway.app import build, tune_gc
    from migctl.gateway.testing import RecordingDispatcher, settings_for
    from migctl.services.events import AgentEvents

    settings = settings_for(POOL)
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, POOL)
    sent = [0]

    def send_task(name: str, *args: Any) -> None:
        sent[0] += 1  # the broker is not what is measured here

    events = AgentEvents(store, settings, RecordingDispatcher())
    app = build(
        settings, store, events, send_task, redis_url, address=f"127.0.0.1:{port}", gateway_id="gw"
    )
    await app.start()
    tune_gc()  # as migctl-grpc-gateway does
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await app.stop(10)


class EchoFloor(pb_grpc.CommandServiceServicer):
    """The least a relay can be: streams in a dict, one pub/sub reader, a counter."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.queues: dict[str, asyncio.Queue[bytes]] = {}
        self.heartbeats = 0

    async def StreamCommands(self, request_iterator: Any, context: Any) -> Any:
        first = await request_iterator.__anext__()
        vm = first.connect.vm_id
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queues[vm] = queue
        yield pb.ControllerMessage(connect_ack=pb.ConnectAck(accepted=True))

        async def read() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("message") == "heartbeat":
                    self.heartbeats += 1

        reader = asyncio.create_task(read())
        try:
            while True:
                yield pb.ControllerMessage.FromString(await queue.get())
        finally:
            reader.cancel()
            self.queues.pop(vm, None)

    async def relay(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(FLOOR_CHANNEL)
        async for message in pubsub.listen():
            data = message["data"]
            vm, _, payload = data.partition(b"|")
            queue = self.queues.get(vm.decode())
            if queue is not None:
                queue.put_nowait(payload)

    async def report(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        while True:
            await asyncio.sleep(1)
            client.hset(
                "bench:floor", mapping={"sessions": len(self.queues), "hb": self.heartbeats}
            )


async def run_floor(redis_url: str, port: int) -> None:
    from migctl.gateway.transport import KEEPALIVE_OPTIONS, PENDING_OPTIONS

    floor = EchoFloor(redis_url)
    server = aio.server(options=[*KEEPALIVE_OPTIONS, *PENDING_OPTIONS])
    pb_grpc.add_CommandServiceServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    from migctl.gateway.app import tune_gc

    tune_gc()  # the same GC treatment as the gateway
    tasks = [asyncio.create_task(floor.relay()), asyncio.create_task(floor.report())]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await server.stop(None)


# -- the agents --------------------------------------------------------------------------------


async def run_agents(redis_url: str, target: str, streams: int, channels: int, beat: float) -> None:
    period = [beat]  # seconds between beats, per agent; the orchestrator may change it
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    pool = [aio.insecure_channel(target, options=DEPLOYED_OPTIONS) for _ in range(channels)]
    gate = asyncio.Semaphore(500)  # connects in flight: a reconnect storm, bounded
    latencies: list[float] = []
    connected = [0]

    async def agent(i: int) -> None:
        vm = vm_id(i)
        stub = pb_grpc.CommandServiceStub(pool[i % channels])
        async with gate:
            call = stub.StreamCommands()
            await call.write(pb.MIGletMessage(connect=pb.ConnectRequest(vm_id=vm, pool_id=POOL)))
            first = await call.read()
            assert first.connect_ack.accepted, first
        connected[0] += 1
        lock = asyncio.Lock()
        beat_msg = pb.MIGletMessage(heartbeat=pb.Heartbeat(vm_id=vm, miglet_state="ready"))

        async def heartbeats() -> None:
            await asyncio.sleep(random.uniform(0, period[0]))
            while True:
                async with lock:
                    await call.write(beat_msg)
                await asyncio.sleep(period[0] * random.uniform(0.9, 1.1))

        ticker = asyncio.create_task(heartbeats())
        try:
            while True:
                msg = await call.read()
                if msg is aio.EOF:
                    return
                if msg.WhichOneof("message") == "command":
                    latencies.append(time.time() - float(msg.command.string_params["sent_at"]))
                    ack = pb.CommandAck(command_id=msg.command.id, success=True)
                    async with lock:
                        await call.write(pb.MIGletMessage(command_ack=ack))
        finally:
            ticker.cancel()

    async def report() -> None:
        # The agents' own collections would stall every stream of this process at once
        # and show up in both servers' latency: once all are connected, freeze them.
        while connected[0] < streams:
            await asyncio.sleep(0.5)
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 10)
        while True:
            await asyncio.sleep(0.5)
            batch, latencies[:] = latencies[:], []
            pipe = client.pipeline(transaction=False)
            pipe.set("bench:connected", connected[0])
            if batch:
                pipe.rpush("bench:latency", *batch)
            pipe.get("bench:beat")
            wanted = (await pipe.execute())[-1]
            if wanted:
                period[0] = float(wanted)

    tasks = [asyncio.create_task(agent(i)) for i in range(streams)]
    tasks.append(asyncio.create_task(report()))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the orchestration ---------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(pred: Any, what: str, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"bench: {what} not reached within {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - start


def measure(kind: str, args: argparse.Namespace, redis_url: str) -> dict[str, float]:
    r = redis.Redis.from_url(redis_url)
    store = RedisStore(r, POOL)
    r.delete("bench:connected", "bench:latency", "bench:floor", "bench:beat")
    port = free_port()
    server = spawn("--role", kind, "--redis", redis_url, "--port", str(port))
    agents = None
    try:
        time.sleep(2)
        agents = spawn(
            "--role", "agents", "--redis", redis_url, "--port", str(port),
            "--streams", str(args.streams), "--channels", str(args.channels),
            "--heartbeat", str(args.heartbeat),
        )  # fmt: skip

        def sessions() -> int:
            if kind == "gateway":
                return int(r.hget(store.k.prefix + "gateways", "gw") or 0)
            return int(r.hget("bench:floor", "sessions") or 0)

        took = wait_for(lambda: sessions() >= args.streams, f"{args.streams} streams", 600)
        time.sleep(args.warmup)
        proc = psutil.Process(server.pid)

        def counters() -> tuple[float, float, float]:
            if kind == "gateway":
                raw = r.hgetall(f"{store.k.prefix}gateway:gw")
                return (
                    float(raw.get(b"heartbeats", 0)),
                    float(raw.get(b"heartbeats_written", 0)),
                    time.monotonic(),
                )
            hb = float(r.hget("bench:floor", "hb") or 0)
            return hb, 0.0, time.monotonic()

        # Latency: commands as a worker writes them, spread over the window.
        vms = random.Random(1).sample(range(args.streams), min(args.commands, args.streams))
        gap = args.window / max(len(vms), 1)
        for i in vms:
            sent_at = repr(time.time())
            if kind == "gateway":
                command = {
                    "id": uuid.uuid4().hex,
                    "type": "set_log_level",
                    "string_params": {"level": "info", "sent_at": sent_at},
                    "created_at": int(time.time()),
                    "expires_at": time.time() + 600,
                }
                store.save(Change(), {}, commands=[(vm_id(i), command, 600)])
            else:
                cmd = pb.Command(id=uuid.uuid4().hex, string_params={"sent_at": sent_at})
                payload = pb.ControllerMessage(command=cmd).SerializeToString()
                r.publish(FLOOR_CHANNEL, vm_id(i).encode() + b"|" + payload)
            time.sleep(gap)
        # Stragglers too: a command whose wake-up was lost arrives with the outbox
        # sweep (30 s); one never relayed would show as relayed < sent.
        deadline = time.monotonic() + 40
        while r.llen("bench:latency") < len(vms) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        rss = proc.memory_info().rss
        threads = proc.num_threads()
        latencies = sorted(float(x) for x in r.lrange("bench:latency", 0, -1))
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99

        # Throughput: every agent beats every `--burst` seconds.
        r.set("bench:beat", args.burst)
        time.sleep(args.heartbeat * 1.1 + 2)  # every agent past its last slow beat
        cpu0, (hb0, wr0, t0) = sum(proc.cpu_times()[:2]), counters()
        time.sleep(args.window)
        cpu1, (hb1, wr1, t1) = sum(proc.cpu_times()[:2]), counters()
        return {
            "connect_s": took,
            "rss_mib": rss / 2**20,
            "threads": threads,
            "relayed": len(latencies),
            "sent": len(vms),
            "p50_ms": q[49] * 1000,
            "p99_ms": q[98] * 1000,
            "hb_in_s": (hb1 - hb0) / (t1 - t0),
            "hb_written_s": (wr1 - wr0) / (t1 - t0),
            "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        }
    finally:
        if agents is not None:
            stop(agents)
        stop(server)
        r.close()


def seed(redis_url: str, streams: int) -> None:
    store = RedisStore(redis.Redis.from_url(redis_url), POOL)
    now = time.time()
    for start in range(0, streams, 500):
        vms = {
            vm_id(i): Vm(id=vm_id(i), infra=InfraStatus.RUNNING, created_at=now, state_since=now)
            for i in range(start, min(start + 500, streams))
        }
        store.save(Change(vms=vms), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument(
        "--heartbeat", type=float, default=15.0, help="seconds between beats (latency phase)"
    )
    parser.add_argument(
        "--burst", type=float, default=1.0, help="seconds between beats (throughput phase)"
    )
    parser.add_argument("--commands", type=int, default=2_000, help="commands relayed")
    parser.add_argument("--window", type=float, default=20.0, help="measurement seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per server, alternating; the best p99 of each is reported (shared machines)",
    )
    parser.add_argument("--role", choices=["bench", "gateway", "floor", "agents"], default="bench")
    parser.add_argument("--redis", default="")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role == "gateway":
        return asyncio.run(run_gateway(args.redis, args.port))
    if args.role == "floor":
        return asyncio.run(run_floor(args.redis, args.port))
    if args.role == "agents":
        target = f"127.0.0.1:{args.port}"
        return asyncio.run(
            run_agents(args.redis, target, args.streams, args.channels, args.heartbeat)
        )

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    server = RedisServer(workdir).start()
    try:
        url = server.url
        seed(url, args.streams)
        print(
            f"{args.streams} streams over {args.channels} channels; {os.cpu_count()} CPUs. "
            f"Latency: {args.commands} commands over {args.window:g}s, a heartbeat every "
            f"{args.heartbeat:g}s per stream ({args.streams / args.heartbeat:,.0f}/s). "
            f"Throughput: a heartbeat every {args.burst:g}s per stream "
            f"(offered {args.streams / args.burst:,.0f}/s)."
        )
        runs: dict[str, list[dict[str, float]]] = {"floor": [], "gateway": []}
        for _ in range(args.repeat):
            for kind in runs:
                runs[kind].append(measure(kind, args, url))
                print(f"  {kind}: " + json.dumps(runs[kind][-1]), flush=True)
        floor = min(runs["floor"], key=lambda run: run["p99_ms"])
        gateway = min(runs["gateway"], key=lambda run: run["p99_ms"])
    finally:
        server.stop()
    rows = [
        ("all streams connected after (s)", "connect_s", "{:.1f}"),
        ("server RSS (MiB)", "rss_mib", "{:.0f}"),
        ("server threads", "threads", "{:.0f}"),
        ("commands relayed / sent", "relayed", "{:.0f}"),
        ("relay latency p50 (ms)", "p50_ms", "{:.1f}"),
        ("relay latency p99 (ms)", "p99_ms", "{:.1f}"),
        ("burst: heartbeats/s ingested", "hb_in_s", "{:,.0f}"),
        ("burst: VM records/s written", "hb_written_s", "{:,.0f}"),
        ("burst: server CPU (% of a core)", "cpu_pct", "{:.0f}"),
    ]
    print(f"{'':34} {'gateway':>12} {'floor':>12} {'ratio':>8}")
    for label, key, fmt in rows:
        g, f = gateway[key], floor[key]
        if key == "relayed":
            g_s, f_s = f"{g:.0f}/{gateway['sent']:.0f}", f"{f:.0f}/{floor['sent']:.0f}"
        else:
            g_s, f_s = fmt.format(g), fmt.format(f) if f else "-"
        ratio = f"{g / f:.2f}x" if f else "-"
        print(f"{label:34} {g_s:>12} {f_s:>12} {ratio:>8}")
    if args.repeat > 1:
        print(f"(best p99 of {args.repeat} runs each; every run is listed above)")


if __name__ == "__main__":
    main()
