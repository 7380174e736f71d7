"""`migctl-webhook`: GitHub's signed `workflow_job` deliveries onto the job topic.

Serves POST /webhook on server.webhook_port. `--catch-up` instead runs one pass asking
GitHub to redeliver failed deliveries; `--catch-up-every S` runs such a pass every S
seconds next to the server (one replica per period).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migctl.domain.errors import MigctlError
from migctl.entry import add_config_flag, start
from migctl.runtime import redis_client
from migctl.settings import ConfigError, Settings
from migctl.webhook.ingress import Ingress
from migctl.webhook.ledger import RedisLedger
from migctl.webhook.ports import Ledger
from migctl.webhook.publishers import build_publisher
from migctl.webhook.server import WebhookServer

log = logging.getLogger("migctl.webhook")

SECRET_ENV = ("MIGCTL_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET")
# A Redis call must not eat GitHub's 10 s: one quick retry, then the ingress fails open.
REDIS_TIMEOUT_S = 0.5


def webhook_secret(env: Mapping[str, str], settings: Settings | None = None) -> bytes:
    """MIGCTL_WEBHOOK_SECRET, else server.webhook_secret (YAML, or env
    GITHUB_WEBHOOK_SECRET / CONTROLLER_SERVER_WEBHOOK_SECRET)."""
    for name in SECRET_ENV:
        if env.get(name):
            return env[name].encode()
    if settings is not None and settings.server.webhook_secret:
        return settings.server.webhook_secret.encode()
    raise ConfigError(
        f"config error: the webhook secret is not set: set {' or '.join(SECRET_ENV)} "
        "to the secret configured on the GitHub App's webhook"
    )


def webhook_redis(settings: Settings) -> redis.Redis:
    return redis_client(
        settings,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )


def run_catch_up(settings: Settings, lookback_s: float) -> int:
    from migctl.webhook.catchup import app_hook, catch_up

    try:
        report = catch_up(app_hook(settings), time.time(), lookback_s)
    except MigctlError as exc:
        print(f"catch-up failed: {exc}")
        return 1
    print(json.dumps(report.as_dict()))
    return 1 if report.failed else 0


def _catch_up_loop(
    settings: Settings, ledger: Ledger, every_s: float, lookback_s: float, stop: threading.Event
) -> None:
    from migctl.webhook.catchup import app_hook, catch_up

    while not stop.wait(every_s):
        try:
            # Slightly less than the period, so the next pass of any replica may run.
            if not ledger.claim("catch-up", every_s * 0.9):
                continue
            report = catch_up(app_hook(settings), time.time(), lookback_s)
            log.info("catch-up: %s", json.dumps(report.as_dict()))
        except MigctlError as exc:
            log.warning("catch-up pass failed: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migctl-webhook", description=__doc__)
    add_config_flag(parser)
    parser.add_argument("--catch-up", action="store_true", help="run one redelivery pass and exit")
    parser.add_argument(
        "--catch-up-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="while serving, run a redelivery pass this often (default: never)",
    )
    parser.add_argument(
        "--lookback",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how far back a pass looks for failed deliveries (default: 6 h)",
    )
    args = parser.parse_args(argv)
    from migctl.webhook.catchup import LOOKBACK_S

    lookback = LOOKBACK_S if args.lookback is None else args.lookback
    if args.catch_up_every < 0 or lookback <= 0:
        parser.error("--catch-up-every and --lookback take positive seconds")
    settings = start(args.config)
    if settings is None:
        return 2
    if args.catch_up:
        return run_catch_up(settings, lookback)
    try:
        secret = webhook_secret(os.environ, settings)
        client = webhook_redis(settings)
        ledger = RedisLedger(client, settings.pool.id)
        publisher = build_publisher(settings, client)
    except ConfigError as exc:
        print(exc)
        return 2
    address = (settings.server.bind, settings.server.webhook_port)
    try:
        server = WebhookServer(address, Ingress(secret, publisher, ledger))
    except OSError as exc:
        print(
            f"config error: server.webhook_port: cannot listen on {address[0]}:{address[1]} "
            f"({exc.strerror or exc}); choose a free port"
        )
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if args.catch_up_every > 0:
        threading.Thread(
            target=_catch_up_loop,
            args=(settings, ledger, args.catch_up_every, lookback, stop),
            name="catch-up",
            daemon=True,
        ).start()
    log.info(
        "webhook listening on %s:%d for pool %s (to %s)",
        address[0],
        server.port,
        settings.pool.id,
        settings.pubsub.topic if settings.pubsub.source == "pubsub" else "the local source",
    )
    stop.wait()
    log.info("webhook stopping")
    if not server.stop():
        log.warning("webhook stopped with requests still in progress")
    publisher.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
