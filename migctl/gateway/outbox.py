"""The gateway's own Redis operations, on redis.asyncio: reading a VM's outbox when it is
woken, recording acks, the outbox sweep, coalesced heartbeat writes, event dedupe, the
"VM taken" notice between replicas. Same keys and formats as `RedisStore` (the
heartbeat script is the store's own), so workers read what the gateway writes.

Why not the thread pool like the blocking calls: measured at 10,000 streams, worker
threads doing many short Redis calls, or building a few thousand heartbeat writes,
contend for the GIL with the event loop that serves the streams (a hand-over can cost a
5 ms switch interval), and relay latency grew by tens of milliseconds. On the loop
these are a few non-blocking round trips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from migctl.adapters.redis_store import ACK_TTL, Keys

log = logging.getLogger(__name__)

HEARTBEAT_CHUNK = 500  # keys per script call: a long script blocks Redis for everyone
OUTBOX_SCAN_CHUNK = 1000
OUTBOX_READ_MAX = 1000  # commands read per pass; a VM never has nearly so many
# A resent event (the agent's at-least-once writes across a reconnect) within this
# window is the same event; distinct events differ in type, data or timestamp.
EVENT_DEDUPE_S = 600

# The outbox in one round trip: ids in order, each followed by its payload ('' if gone).
_READ_LUA = """
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = payloads[i] or ''
end
return out
"""

# The store's ack script records an outcome for any command id it is given and reports
# "first" only while the command is still in the outbox. This one records nothing for
# ids the VM was never sent (an agent cannot fill Redis with ack records), and records
# the first ack of a command this stream delivered that left the outbox since (expired
# after delivery). Same keys and format as the store's.
_ACK_LUA = """
-- KEYS[1] outbox list, KEYS[2] payload hash, KEYS[3] ack record.
-- ARGV[1] command id, ARGV[2] outcome JSON, ARGV[3] ttl s, ARGV[4] '1' if delivered here.
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed > 0 then
  redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
  return 1
end
if ARGV[4] == '1' and redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3], 'NX') then
  return 1
end
return 0
"""


def taken_channel(keys: Keys) -> str:
    """Pub/sub: {"vm", "session", "at"} each time a replica takes a VM's stream."""
    return keys.prefix + "taken"


class Outbox:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.r = client
        self.k = keys
        self._read = client.register_script(_READ_LUA)
        heartbeat = resources.files("migctl.adapters").joinpath("lua/heartbeat.lua").read_text()
        self._heartbeat = client.register_script(heartbeat)
        self._ack = client.register_script(_ACK_LUA)

    async def pending(self, vm_id: str, now: float | None = None) -> list[dict[str, Any]]:
        """Unacked, unexpired commands, oldest first; expired ones are removed (as
        `RedisStore.pending_commands` does)."""
        now = time.time() if now is None else now
        flat = await self._read(
            keys=[self.k.outbox(vm_id), self.k.cmds(vm_id)], args=[OUTBOX_READ_MAX]
        )
        out, expired = [], []
        for raw_id, payload in zip(flat[::2], flat[1::2], strict=True):
            cmd_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            command = json.loads(payload) if payload else None
            if command is None or (command.get("expires_at", 0) and command["expires_at"] <= now):
                expired.append(cmd_id)
            else:
                out.append(command)
        if expired:
            pipe = self.r.pipeline(transaction=False)
            for cmd_id in expired:
                pipe.lrem(self.k.outbox(vm_id), 0, cmd_id)
                pipe.hdel(self.k.cmds(vm_id), cmd_id)
            await pipe.execute()
        return out

    async def nonempty(self, vm_ids: Sequence[str]) -> list[str]:
        """The VMs among `vm_ids` with commands in their outbox (pipelined LLEN)."""
        out: list[str] = []
        for i in range(0, len(vm_ids), OUTBOX_SCAN_CHUNK):
            chunk = vm_ids[i : i + OUTBOX_SCAN_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            for vm_id in chunk:
                pipe.llen(self.k.outbox(vm_id))
            lengths = await pipe.execute()
            out += [vm_id for vm_id, n in zip(chunk, lengths, strict=True) if n]
        return out

    async def touch_heartbeats(self, beats: Mapping[str, float]) -> int:
        """last_heartbeat of each VM that still exists; a few script calls a second."""
        ids = list(beats)
        written = 0
        for i in range(0, len(ids), HEARTBEAT_CHUNK):
            chunk = ids[i : i + HEARTBEAT_CHUNK]
            written += int(
                await self._heartbeat(
                    keys=[self.k.vm(vm_id) for vm_id in chunk],
                    args=[repr(beats[vm_id]) for vm_id in chunk],
                )
            )
        return written

    # -- acks -----------------------------------------------------------------------------

    async def ack_pending(self, vm_id: str, command_id: str, delivered: bool) -> bool:
        """Whether an ack of this command would be its first: the command is still in
        the outbox, or this stream delivered it and no ack is recorded."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpos(self.k.outbox(vm_id), command_id)
        pipe.exists(self.k.ack(command_id))
        position, recorded = await pipe.execute()
        return position is not None or (delivered and not recorded)

    async def record_ack(
        self, vm_id: str, command_id: str, outcome: Mapping[str, Any], delivered: bool
    ) -> bool:
        """Record an agent's ack; True for the first ack of a command it was sent."""
        keys = [self.k.outbox(vm_id), self.k.cmds(vm_id), self.k.ack(command_id)]
        args: list[str | int] = [
            command_id,
            json.dumps(dict(outcome)),
            ACK_TTL,
            "1" if delivered else "0",
        ]
        return bool(await self._ack(keys=keys, args=args))

    # -- events and notices ---------------------------------------------------------------

    async def first_sight(
        self, vm_id: str, kind: str, data: Mapping[str, str], timestamp: int
    ) -> bool:
        """False when this exact event was relayed already (an agent resending it)."""
        if not timestamp:
            return True  # without a timestamp two distinct events may look identical
        key = self._event_key(vm_id, kind, data, timestamp)
        return bool(await self.r.set(key, "1", nx=True, ex=EVENT_DEDUPE_S))

    async def forget_sight(
        self, vm_id: str, kind: str, data: Mapping[str, str], timestamp: int
    ) -> None:
        """Undo `first_sight` for an event that could not be handed to the workers."""
        if timestamp:
            await self.r.delete(self._event_key(vm_id, kind, data, timestamp))

    def _event_key(self, vm_id: str, kind: str, data: Mapping[str, str], timestamp: int) -> str:
        text = json.dumps([vm_id, kind, sorted(data.items()), timestamp])
        return self.k.prefix + "event:" + hashlib.sha256(text.encode()).hexdigest()[:32]

    async def announce(self, vm_id: str, session_id: str, started: float) -> None:
        """Tell the other replicas this VM's stream is here now."""
        notice = json.dumps({"vm": vm_id, "session": session_id, "at": started})
        await self.r.publish(taken_channel(self.k), notice)
