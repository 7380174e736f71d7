"""Where a verified delivery goes: the Pub/Sub job topic, or the local world's Redis source.

Google's and Redis' errors stop here; callers see `TemporaryError` (answer 503, so GitHub
marks the delivery failed and the catch-up can redeliver it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import redis
from google.api_core import exceptions as gexc
from google.api_core import retry as retries

from migctl.bridge.local_source import publish_local
from migctl.domain.errors import TemporaryError
from migctl.settings import ConfigError, Settings, env_hint

# Pub/Sub takes 10 MB of data per message; keep room for the attributes and the framing.
PUBSUB_MAX_BYTES = 10_000_000 - 16 * 1024
# GitHub gives up on a delivery after 10 s; the Redis calls around the publish take at most
# about a second, so 4 s leaves the answer well inside the limit.
PUBLISH_TIMEOUT_S = 4.0
LOCAL_MAX_BYTES = 25 * 1024 * 1024
_RETRYABLE = retries.if_exception_type(
    gexc.Aborted,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.ServiceUnavailable,
    gexc.Unknown,
)


class PubsubPublisher:
    """`Publisher` on a google-cloud-pubsub `PublisherClient` (batching, thread-safe)."""

    max_bytes = PUBSUB_MAX_BYTES

    def __init__(self, client: Any, topic_path: str, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.client = client
        self.topic_path = topic_path
        self.timeout_s = timeout_s
        # The client's default publish retry runs for a minute; ours stops with our answer.
        self._retry = retries.Retry(
            predicate=_RETRYABLE, initial=0.1, maximum=1.0, multiplier=2.0, timeout=timeout_s
        )

    def publish(self, data: bytes, attributes: Mapping[str, str]) -> str:
        try:
            future = self.client.publish(
                self.topic_path, data, retry=self._retry, timeout=self.timeout_s, **attributes
            )
            return str(future.result(timeout=self.timeout_s))
        except (gexc.GoogleAPIError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: a publisher already stopped (shutting down).
            raise TemporaryError(
                f"Pub/Sub topic {self.topic_path}: {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        self.client.stop()  # flushes what is batched


class LocalPublisher:
    """`Publisher` on the local world's Redis list source (`pubsub.source: local`)."""

    max_bytes = LOCAL_MAX_BYTES

    def __init__(self, client: redis.Redis, pool_id: str) -> None:
        self.client = client
        self.pool_id = pool_id

    def publish(self, data: bytes, attributes: Mapping[str, str]) -> str:
        try:
            return publish_local(self.client, self.pool_id, data, attributes)
        except redis.RedisError as exc:
            raise TemporaryError(f"local job source (Redis): {exc}") from exc

    def close(self) -> None:
        pass


def build_publisher(settings: Settings, client: redis.Redis) -> PubsubPublisher | LocalPublisher:
    """The destination the settings name; `ConfigError` when they do not name one."""
    ps = settings.pubsub
    if ps.source == "local":
        return LocalPublisher(client, settings.pool.id)
    if not ps.topic:
        raise ConfigError(
            f"config error: pubsub.topic (env {env_hint(('pubsub', 'topic'))}): required by "
            "migctl-webhook when pubsub.source is pubsub, not set"
        )
    host = ps.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST", "")
    if host:
        from migctl.sim.pubsub_emulator import publisher_client

        client_ = publisher_client(host)
    else:
        from google.cloud import pubsub_v1

        client_ = pubsub_v1.PublisherClient()
    return PubsubPublisher(client_, client_.topic_path(ps.project_id, ps.topic))
