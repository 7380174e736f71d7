"""Working in-memory fakes of the webhook's ports, with fault injection, for tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from migctl.domain.errors import TemporaryError


@dataclass
class MemoryPublisher:
    """Keeps what it publishes. `fail(n)` makes the next n publishes raise `TemporaryError`."""

    max_bytes: int = 10_000_000
    delay_s: float = 0.0  # each publish takes this long (a slow topic)
    messages: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    _failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, times: int = 1) -> None:
        with self._lock:
            self._failures = times

    def publish(self, data: bytes, attributes: Mapping[str, str]) -> str:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                raise TemporaryError("topic unavailable (simulated)", delay=0.0)
            self.messages.append((data, dict(attributes)))
            return str(len(self.messages))

    def close(self) -> None:
        pass


@dataclass
class MemoryLedger:
    """`Ledger` in a dict; no TTLs. `down = True` makes every call raise `TemporaryError`."""

    down: bool = False
    delivered: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    claims: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self) -> None:
        if self.down:
            raise TemporaryError("ledger unavailable (simulated)", delay=0.0)

    def seen(self, delivery_id: str) -> bool:
        self._check()
        with self._lock:
            return delivery_id in self.delivered

    def remember(self, delivery_id: str) -> bool:
        self._check()
        with self._lock:
            new = delivery_id not in self.delivered
            self.delivered.add(delivery_id)
            return new

    def count(self, *names: str) -> None:
        self._check()
        with self._lock:
            self.counts.update(names)

    def counters(self) -> dict[str, int]:
        self._check()
        with self._lock:
            return dict(self.counts)

    def claim(self, name: str, ttl_s: float) -> bool:
        self._check()
        now = time.monotonic()
        with self._lock:
            if self.claims.get(name, 0.0) > now:
                return False
            self.claims[name] = now + ttl_s
            return True
