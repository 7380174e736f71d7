"""The webhook's memory in Redis: published delivery ids (with a TTL) and counters.

Keys follow the store's layout, `migctl:{<pool>}:webhook:...`, the braces a Redis Cluster
hash tag that keeps them in the pool's slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from migctl.domain.errors import TemporaryError

# GitHub lets a delivery be redelivered for 3 days; remember ids at least that long.
DELIVERY_TTL_S = 3 * 86400


class RedisLedger:
    """`Ledger` on Redis. One SET NX per published delivery, one pipelined HINCRBY per request."""

    def __init__(
        self, client: redis.Redis, pool_id: str, delivery_ttl_s: int = DELIVERY_TTL_S
    ) -> None:
        self.r = client
        self.prefix = f"migctl:{{{pool_id}}}:webhook:"
        self.counters_key = self.prefix + "counters"
        self.delivery_ttl_s = delivery_ttl_s

    def delivery_key(self, delivery_id: str) -> str:
        return f"{self.prefix}delivery:{delivery_id}"

    def seen(self, delivery_id: str) -> bool:
        return bool(self._call(self.r.exists, self.delivery_key(delivery_id)))

    def remember(self, delivery_id: str) -> bool:
        key = self.delivery_key(delivery_id)
        return bool(self._call(self.r.set, key, "1", nx=True, ex=self.delivery_ttl_s))

    def count(self, *names: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hincrby(self.counters_key, name, 1)
        self._call(pipe.execute)

    def counters(self) -> dict[str, int]:
        raw = self._call(self.r.hgetall, self.counters_key)
        return {_text(k): int(v) for k, v in raw.items()}

    def claim(self, name: str, ttl_s: float) -> bool:
        key = self.prefix + "claim:" + name
        return bool(self._call(self.r.set, key, "1", nx=True, px=max(1, int(ttl_s * 1000))))

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise TemporaryError(f"Redis unavailable: {exc}", delay=2.0) from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
