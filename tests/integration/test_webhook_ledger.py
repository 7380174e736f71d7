"""One contract for the webhook's `Ledger`, run against the in-memory fake and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migctl.domain.errors import TemporaryError
from migctl.sim.stack import free_port
from migctl.webhook.ledger import RedisLedger
from migctl.webhook.ports import Ledger
from migctl.webhook.testing import MemoryLedger

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisLedger(client, "pool-ledger")
    client.close()


def test_a_delivery_is_seen_once_remembered(ledger: Ledger) -> None:
    assert not ledger.seen("d-1")
    assert ledger.remember("d-1") is True
    assert ledger.seen("d-1") and not ledger.seen("d-2")
    assert ledger.remember("d-1") is False  # a second publisher lost the race


def test_counters_add_up(ledger: Ledger) -> None:
    assert ledger.counters() == {}
    ledger.count("received", "accepted")
    ledger.count("received", "refused:bad_signature")
    assert ledger.counters() == {"received": 2, "accepted": 1, "refused:bad_signature": 1}


def test_a_claim_is_held_for_its_ttl(ledger: Ledger) -> None:
    assert ledger.claim("catch-up", 60) is True
    assert ledger.claim("catch-up", 60) is False
    assert ledger.claim("other", 60) is True


def test_redis_keys_and_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ledger = RedisLedger(client, "pool-x", delivery_ttl_s=120)
    ledger.remember("abc")
    ledger.count("received")
    assert 0 < client.ttl("migctl:{pool-x}:webhook:delivery:abc") <= 120
    assert client.hgetall("migctl:{pool-x}:webhook:counters") == {b"received": b"1"}
    client.close()


def test_redis_unreachable_is_temporary() -> None:
    # As migctl-webhook builds it: one quick retry.
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
    ledger = RedisLedger(client, "pool-x")
    for call in (lambda: ledger.seen("a"), lambda: ledger.remember("a"), ledger.counters):
        with pytest.raises(TemporaryError, match="Redis unavailable"):
            call()
    with pytest.raises(TemporaryError):
        ledger.count("received")
