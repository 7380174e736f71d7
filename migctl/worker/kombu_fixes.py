"""A work-around for kombu's Redis transport (5.x), applied when the Celery app is built.

When the broker connection drops while the worker is already recovering from an earlier
drop (a Redis restart), Celery closes the old connection and kombu's channel close tries
to put the channel's unacked messages back with a client built from that connection,
which is gone: `AttributeError: 'NoneType' object has no attribute 'hostname'`. Celery
takes that for an unrecoverable error and the worker exits (seen in the Redis-restart
fault test; kombu issues #582 and #970 show the same path).

Nothing is lost by not restoring them there: the messages stay in kombu's `unacked` hash
in Redis, and any consumer's periodic `restore_visible` brings them back after the
visibility timeout, as it does for a worker killed with -9.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

log = logging.getLogger(__name__)


def patch_restore_unacked() -> None:
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_migctl_patched", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except (AttributeError, redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning(
                "could not put %d unacked message(s) back on a closed broker connection "
                "(%s: %s); they return after the visibility timeout",
                len(self._delivered),
                type(exc).__name__,
                exc,
            )
            return None

    restore_unacked._migctl_patched = True  # type: ignore[attr-defined]
    restore_unacked.__wrapped__ = original  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
