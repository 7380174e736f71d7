"""A fleet of light MIGlet agents in one process: the real wire protocol over grpc.aio,
without the simulated runner (no fake GitHub, no jobs). For bench/pipeline_bench.py.

    python bench/light_agents.py --target 127.0.0.1:PORT --pool bench --vms 1000

Each agent behaves as PROTOCOL.md says a deployed MIGlet does up to the point the
pipeline bench measures, and answers what follows so the controller's follow-up work
is real too:

- opens its stream (keepalive pings every 10 s, permitted without calls), sends
  `connect`, waits for `connect_ack`, sends a heartbeat (`ready`), then one every
  `--heartbeat` seconds with a random phase;
- on `register_runner`: records the time it arrived (the bench's end point), checks the
  keys a deployed agent reads (`registration_token`, `runner_url`), and then, as a
  deployed agent registering its runner: heartbeat `registering_runner`, `command_ack`
  (success), event `runner_registered`, heartbeat `idle`;
- any other command is acked.

Streams share `--channels` HTTP/2 connections (a real fleet has one per VM; the
gateway's per-stream work is the same). Reports on stdout, one line each:
`CONNECTED n`, `READY n` (all streams accepted), `RECV vm_id command_id epoch_s bad`.

By default an agent whose stream ends stays down (`EOF vm_id` / `BROKEN vm_id CODE`).
With `--reconnect` it opens a new stream after a capped, jittered exponential backoff
(`--backoff-base`, `--backoff-cap`; a stream that was accepted resets it), as deployed
agents do after a gateway restart; `CONNECTED n` then counts the streams open now
(`READY n` each time all are back) and `SESSIONS n` the streams accepted so far.
`connect_ack{accepted: false}` stops an agent for good in both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from dataclasses import dataclass

from grpc import aio

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


class Out:
    """Buffered report lines, flushed every few milliseconds."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.flush()

    def flush(self) -> None:
        if self.lines:
            sys.stdout.write("".join(self.lines))
            sys.stdout.flush()
            self.lines.clear()


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with equal jitter (never zero), as deployed agents use."""

    base: float = 0.5
    cap: float = 10.0

    def delay(self, failures: int) -> float:
        delay = min(self.cap, self.base * 2.0 ** (max(failures, 1) - 1))
        return delay / 2 + random.uniform(0, delay / 2)


async def agent(
    vm_id: str,
    pool: str,
    channel: aio.Channel,
    beat: float,
    follow: bool,
    out: Out,
    connected: list[int],
    gate: asyncio.Semaphore,
    backoff: Backoff | None = None,
    sessions: list[int] | None = None,
) -> None:
    """One agent. `backoff` None: one stream, as before; else reconnect after each end."""
    stub = pb_grpc.CommandServiceStub(channel)
    failures = 0
    while True:
        try:
            async with gate:
                call = stub.StreamCommands()
                await call.write(
                    pb.MIGletMessage(
                        connect=pb.ConnectRequest(
                            vm_id=vm_id, pool_id=pool, org_id="bench-org", version="bench/1"
                        )
                    )
                )
                first = await call.read()
            refused = first is aio.EOF or not first.connect_ack.accepted
            if backoff is not None and (first is aio.EOF or not first.HasField("connect_ack")):
                # The stream ended before any answer (a gateway stopping): try again.
                out.put(f"RETRY {vm_id} {'EOF' if first is aio.EOF else 'NO_ACK'}\n")
                call.cancel()
                failures += 1
                await asyncio.sleep(backoff.delay(failures))
                continue
            if refused:
                out.put(f"REFUSED {vm_id} {first}\n")
                return
        except aio.AioRpcError as exc:
            out.put(f"RETRY {vm_id} {exc.code().name}\n")
            if backoff is None:
                await asyncio.sleep(0.5 + random.random())
            else:
                failures += 1
                await asyncio.sleep(backoff.delay(failures))
            continue
        if backoff is None:
            await serve(call, vm_id, pool, beat, follow, out, connected, sessions)
            return
        try:
            opened = await serve(call, vm_id, pool, beat, follow, out, connected, sessions)
        except (aio.AioRpcError, asyncio.InvalidStateError) as exc:  # before it was counted
            out.put(f"RETRY {vm_id} {_code(exc)}\n")
            opened = False
        if opened:
            connected[0] -= 1
        # An accepted stream that ended: the shortest wait first; else back off further.
        failures = 1 if opened else failures + 1
        await asyncio.sleep(backoff.delay(failures))


def _code(exc: BaseException) -> str:
    return exc.code().name if isinstance(exc, aio.AioRpcError) else "ENDED"


async def serve(
    call: aio.StreamStreamCall,
    vm_id: str,
    pool: str,
    beat: float,
    follow: bool,
    out: Out,
    connected: list[int],
    sessions: list[int] | None,
) -> bool:
    """One accepted stream, until it ends. True if it was counted in `connected`."""
    lock = asyncio.Lock()

    def heartbeat(state: str) -> pb.MIGletMessage:
        return pb.MIGletMessage(
            heartbeat=pb.Heartbeat(
                vm_id=vm_id,
                pool_id=pool,
                org_id="bench-org",
                timestamp=int(time.time()),
                miglet_state=state,
            )
        )

    state = "ready"
    opened = False

    async def ticker() -> None:
        await asyncio.sleep(random.uniform(0, beat))
        while True:
            async with lock:
                await call.write(heartbeat(state))
            await asyncio.sleep(beat)

    tick: asyncio.Task[None] | None = None
    try:
        async with lock:
            await call.write(heartbeat(state))
        connected[0] += 1
        opened = True
        if sessions is not None:
            sessions[0] += 1
        tick = asyncio.create_task(ticker())
        while True:
            msg = await call.read()
            if msg is aio.EOF:
                out.put(f"EOF {vm_id}\n")
                return opened
            if msg.WhichOneof("message") != "command":
                continue
            cmd = msg.command
            if cmd.type != "register_runner":
                async with lock:
                    await call.write(
                        pb.MIGletMessage(command_ack=pb.CommandAck(command_id=cmd.id, success=True))
                    )
                continue
            at = time.time()
            params = cmd.string_params
            bad = int(not (params.get("registration_token") and params.get("runner_url")))
            out.put(f"RECV {vm_id} {cmd.id} {at!r} {bad}\n")
            ack = pb.CommandAck(command_id=cmd.id, success=True, message="runner registered")
            if not follow:
                async with lock:
                    await call.write(pb.MIGletMessage(command_ack=ack))
                continue
            event = pb.EventNotification(
                type="runner_registered",
                vm_id=vm_id,
                pool_id=pool,
                org_id="bench-org",
                data={
                    "runner_url": params.get("runner_url", ""),
                    "runner_group": params.get("runner_group", ""),
                },
                timestamp=int(time.time()),
            )
            async with lock:
                state = "registering_runner"
                await call.write(heartbeat(state))
                await call.write(pb.MIGletMessage(command_ack=ack))
                await call.write(pb.MIGletMessage(event=event))
                state = "idle"
                await call.write(heartbeat(state))
    except (aio.AioRpcError, asyncio.InvalidStateError) as exc:
        if not opened:
            raise  # as before: only a stream that was counted reports BROKEN
        # InvalidStateError: a write raced the end of the call.
        out.put(f"BROKEN {vm_id} {_code(exc)}\n")
    finally:
        if tick is not None:
            tick.cancel()
            # A write of the ticker may have failed with the stream: retrieve it.
            await asyncio.gather(tick, return_exceptions=True)
    return opened


async def main_async(args: argparse.Namespace) -> None:
    out = Out()
    channels = [
        aio.insecure_channel(args.target, options=CHANNEL_OPTIONS) for _ in range(args.channels)
    ]
    connected = [0]
    sessions = [0] if args.reconnect else None
    backoff = Backoff(args.backoff_base, args.backoff_cap) if args.reconnect else None
    gate = asyncio.Semaphore(200)
    ids = [f"{args.prefix}{i:05d}" for i in range(args.vms)]
    tasks = [
        asyncio.create_task(
            agent(
                vm,
                args.pool,
                channels[i % len(channels)],
                args.heartbeat,
                not args.ack_only,
                out,
                connected,
                gate,
                backoff,
                sessions,
            )
        )
        for i, vm in enumerate(ids)
    ]
    flusher = asyncio.create_task(out.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def progress() -> None:
        reported = -1
        accepted = 0
        while True:
            await asyncio.sleep(0.2)
            if sessions is not None and sessions[0] != accepted:
                accepted = sessions[0]
                out.put(f"SESSIONS {accepted}\n")
            if connected[0] != reported:
                reported = connected[0]
                out.put(f"CONNECTED {reported}\n")
                if reported == len(ids):
                    out.put(f"READY {reported}\n")

    prog = asyncio.create_task(progress())
    await stop.wait()
    for t in [*tasks, prog, flusher]:
        t.cancel()
    await asyncio.gather(*tasks, prog, flusher, return_exceptions=True)
    out.flush()
    for ch in channels:
        await ch.close(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--prefix", default="vm-")
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds (PROTOCOL: 15)")
    parser.add_argument("--ack-only", action="store_true", help="no follow-up event/states")
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="open a new stream after one ends (default: an agent whose stream ends stays down)",
    )
    parser.add_argument("--backoff-base", type=float, default=0.5, help="seconds (--reconnect)")
    parser.add_argument("--backoff-cap", type=float, default=10.0, help="seconds (--reconnect)")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
