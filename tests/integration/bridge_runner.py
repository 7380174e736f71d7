"""A bridge process for tests/integration/test_bridge_faults.py, one that can hold its messages.

`python -m tests.integration.bridge_runner --config FILE --hold`: the real `Bridge`, the real
`RedisIntake` and the real `CeleryDispatcher`, wired by `migctl.runtime` from the config.
With `--hold`, every message is kept unacked forever: even job ids are first persisted (and
their `assign_job` sent), odd ones are not. Each held job id is RPUSHed to `HELD_KEY`, so the
test knows when to SIGKILL the process. The holder asks for 10 s leases, so that once it is
dead its messages come back soon (FACTS B.2).
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from google.cloud import pubsub_v1

from migctl import runtime as rt
from migctl.bridge.main import pubsub_clients
from migctl.bridge.messages import JobEvent
from migctl.bridge.ports import Intake, Outcome
from migctl.bridge.subscriber import Bridge
from migctl.logs import setup_logging
from migctl.settings import load_settings

HELD_KEY = "test:bridge-runner:held"


class ShortLeaseSubscriber:
    """The real SubscriberClient, subscribing with 10 s leases (`max_duration_per_lease_extension`:
    it also sets the stream's ack deadline, 60 s by default)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def subscribe(self, subscription: str, callback: Callable[[Any], None], **kw: Any) -> Any:
        kw["flow_control"] = pubsub_v1.types.FlowControl(
            max_messages=kw["flow_control"].max_messages, max_duration_per_lease_extension=10
        )
        return self.inner.subscribe(subscription, callback=callback, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HoldingIntake:
    """Wraps the real intake; never returns from `accept`, so nothing is ever acked."""

    def __init__(self, inner: Intake, runtime: rt.Runtime) -> None:
        self.inner = inner
        self.runtime = runtime
        self._forever = threading.Event()

    def accept(self, event: JobEvent) -> Outcome:
        if int(event.job_id) % 2 == 0:
            self.inner.accept(event)
        self.runtime.redis.rpush(HELD_KEY, event.job_id)
        self._forever.wait()
        raise AssertionError("unreachable")

    def dead_letter(
        self, raw: bytes, attributes: Mapping[str, str], reason: str, message_id: str
    ) -> None:
        self.inner.dead_letter(raw, attributes, reason, message_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    settings = load_settings(args.config)
    setup_logging(settings)
    rt.use_settings(settings)
    runtime = rt.runtime()
    intake: Intake = runtime.intake
    sub, _ = pubsub_clients(settings)
    if args.hold:
        intake = HoldingIntake(intake, runtime)
        sub = ShortLeaseSubscriber(sub)
    path = sub.subscription_path(settings.pubsub.project_id, settings.pubsub.subscription)
    bridge = Bridge(sub, path, intake, settings.pool.id, max_messages=settings.pubsub.max_messages)
    logging.getLogger("bridge_runner").info("holding: %s", args.hold)
    bridge.run(threading.Event())


if __name__ == "__main__":
    main()
