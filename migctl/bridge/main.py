"""`migctl-bridge`: queued-job messages in (Pub/Sub, or the local Redis source), durable
jobs and `assign_job` tasks out. Acks only after the job is stored and its task sent."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from migctl.entry import add_config_flag, start
from migctl.settings import Settings

log = logging.getLogger("migctl.bridge")

STATS_EVERY_S = 2.0


def pubsub_clients(settings: Settings) -> tuple[Any, Any]:
    """Subscriber and publisher, pointed at the emulator when one is configured."""
    from google.cloud import pubsub_v1

    host = settings.pubsub.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST", "")
    if host:
        from migctl.sim.pubsub_emulator import publisher_client, subscriber_client

        return subscriber_client(host), publisher_client(host)
    return pubsub_v1.SubscriberClient(), pubsub_v1.PublisherClient()


def build_source(settings: Settings) -> Any:
    from migctl import runtime as rt

    rt.use_settings(settings)
    runtime = rt.runtime()
    pool = settings.pool.id
    if settings.pubsub.source == "local":
        from migctl.bridge.local_source import LocalSource

        return LocalSource(runtime.redis, pool, runtime.intake, pool)
    from migctl.bridge.subscriber import Bridge

    sub, pub = pubsub_clients(settings)
    ps = settings.pubsub
    path = sub.subscription_path(ps.project_id, ps.subscription)
    topic = pub.topic_path(ps.project_id, ps.dead_letter_topic) if ps.dead_letter_topic else ""
    return Bridge(
        sub,
        path,
        runtime.intake,
        pool,
        max_messages=ps.max_messages,
        publisher=pub,
        dead_letter_topic=topic,
    )


def _report(source: Any, stop: threading.Event) -> None:
    from migctl.runtime import runtime

    while not stop.wait(STATS_EVERY_S):
        try:
            runtime().store.set_bridge_stats(source.stats())
        except Exception as exc:
            log.debug("bridge stats not written: %s", exc)
    try:
        runtime().store.set_bridge_stats(source.stats())
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migctl-bridge", description=__doc__)
    add_config_flag(parser)
    args = parser.parse_args(argv)
    settings = start(args.config)
    if settings is None:
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    source = build_source(settings)
    reporter = threading.Thread(target=_report, args=(source, stop), daemon=True)
    reporter.start()
    log.info("bridge started for pool %s (source: %s)", settings.pool.id, settings.pubsub.source)
    source.run(stop)
    stop.set()
    reporter.join(timeout=5)
    log.info("bridge stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
