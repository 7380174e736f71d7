"""kombu's Redis transport: a channel closed after its connection is gone must not take
the worker down, and its unacked messages must still come back (migctl/worker/kombu_fixes)."""

from __future__ import annotations

import time

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from migctl.worker.kombu_fixes import patch_restore_unacked

pytestmark = pytest.mark.integration


def test_unacked_messages_of_a_lost_connection_come_back_later(redis_url: str) -> None:
    patch_restore_unacked()
    patch_restore_unacked()  # idempotent
    queue = Queue("fixes-q", Exchange("fixes-x", type="direct"), routing_key="fixes-q")
    options = {"visibility_timeout": 1}
    with Connection(redis_url, transport_options=options) as producer:
        producer.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key="fixes-q", declare=[queue]
        )
    lost = Connection(redis_url, transport_options=options)
    channel = lost.channel()
    message = queue.bind(channel).get(no_ack=False)  # delivered, never acked
    assert message is not None and message.payload == {"n": 1}
    # The state Celery closes the channel in after a second broker error: its pool was
    # dropped with the broken connection and the transport has lost its client (kombu
    # builds the restore client from it).
    channel._pool = None
    channel.connection.client = None
    original = kombu_redis.QoS.restore_unacked.__wrapped__  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="hostname"):
        original(channel.qos)  # what the worker died of
    channel.qos.restore_unacked_once()  # patched: logged, not raised

    with Connection(redis_url, transport_options=options) as fresh:
        fresh_channel = fresh.channel()
        bound = queue.bind(fresh_channel)
        assert bound.get(no_ack=True) is None  # still unacked, not back yet
        deadline = time.monotonic() + 10
        again = None
        while again is None and time.monotonic() < deadline:
            time.sleep(0.2)  # past the visibility timeout, the periodic sweep returns it
            fresh_channel.qos.restore_visible(start=0, num=10)
            again = bound.get(no_ack=True)
        assert again is not None and again.payload == {"n": 1}
