"""The gateway's counters, published to Redis once a second.

Each replica writes its own hash `migctl:{pool}:gateway:<id>` (with a TTL, so a crashed
replica's numbers fade) and its session count into the pool's `gateways` hash that the
HTTP /stats sums as `connected_vms`. Entries of replicas silent for `STALE_S` are pruned
by whichever replica publishes next, so a crashed one is not counted forever.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from migctl.adapters.redis_store import RedisStore

STALE_S = 30.0
HASH_TTL_S = 60


@dataclass
class GatewayStats:
    started_at: float = field(default_factory=time.time)
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    replaced: int = 0  # sessions ended by a newer stream of the same VM
    disconnects: int = 0
    frames: int = 0  # messages read from agents, of any kind
    malformed: int = 0  # frames that are not a MIGletMessage
    ignored: int = 0  # well-formed but meaningless: unknown oneof, second connect, ...
    heartbeats: int = 0
    heartbeats_written: int = 0  # VM records whose last_heartbeat the flushes updated
    events: int = 0  # relayed to the workers
    events_duplicate: int = 0
    events_dropped: int = 0  # unknown type, oversized, or the broker refused them
    acks: int = 0  # first acks, relayed to the workers
    acks_duplicate: int = 0
    commands_sent: int = 0
    commands_expired: int = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def fields(self, sessions: int) -> dict[str, str]:
        out = {
            name: str(getattr(self, name))
            for name in self.__dataclass_fields__
            if name not in ("refused", "started_at")
        }
        out["started_at"] = repr(self.started_at)
        out["sessions"] = str(sessions)
        out["refused"] = str(sum(self.refused.values()))
        out.update({f"refused:{reason}": str(n) for reason, n in self.refused.items()})
        return out


def stats_key(store: RedisStore, gateway_id: str) -> str:
    return f"{store.k.prefix}gateway:{gateway_id}"


def publish(store: RedisStore, gateway_id: str, fields: dict[str, str], sessions: int) -> None:
    """One pipelined round trip, then pruning of replicas that stopped publishing."""
    now = time.time()
    seen_key = store.k.prefix + "gateways:seen"
    pipe = store.r.pipeline(transaction=False)
    mapping: dict[Any, Any] = {**fields, "seen_at": repr(now)}
    pipe.hset(stats_key(store, gateway_id), mapping=mapping)
    pipe.expire(stats_key(store, gateway_id), HASH_TTL_S)
    pipe.hset(store.k.prefix + "gateways", gateway_id, sessions)
    pipe.hset(seen_key, gateway_id, repr(now))
    pipe.hgetall(seen_key)
    seen = pipe.execute()[-1]
    stale = [gid for gid, at in seen.items() if now - float(at) > STALE_S]
    if stale:
        pipe = store.r.pipeline(transaction=False)
        pipe.hdel(store.k.prefix + "gateways", *stale)
        pipe.hdel(seen_key, *stale)
        pipe.execute()


def withdraw(store: RedisStore, gateway_id: str, fields: dict[str, str]) -> None:
    """A replica leaving: its streams are gone from `gateways`; its final counters stay
    readable until the hash's TTL."""
    pipe = store.r.pipeline(transaction=False)
    mapping: dict[Any, Any] = {**fields, "sessions": "0", "stopped": "1"}
    pipe.hset(stats_key(store, gateway_id), mapping=mapping)
    pipe.expire(stats_key(store, gateway_id), HASH_TTL_S)
    pipe.hdel(store.k.prefix + "gateways", gateway_id)
    pipe.hdel(store.k.prefix + "gateways:seen", gateway_id)
    pipe.execute()
