"""The Celery app, built from settings on first use (`celery -A migctl ...` finds it as
`migctl.app`). Reliability settings are chosen here, with their reasons."""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta
from typing import Any

from celery import Celery
from kombu.entity import Queue

from migctl.settings import ConfigError, Settings
from migctl.worker.kombu_fixes import patch_restore_unacked
from migctl.worker.queues import KINDS, ROUTES, queue

_lock = threading.Lock()
_app: Celery | None = None


def build_app(settings: Settings) -> Celery:
    patch_restore_unacked()  # a worker must not exit when Redis restarts (kombu_fixes)
    pool = settings.pool.id
    broker = settings.redis.jobs.url()
    app = Celery("migctl", broker=broker, set_as_current=True)
    # The longest task is a provisioning pass (seconds) and the longest countdown a
    # minute; a redelivery window above both avoids duplicate runs (FACTS D.1), and a
    # short one makes kill -9 recovery fast. Tests shorten it.
    visibility = float(os.environ.get("MIGCTL_VISIBILITY_TIMEOUT", "300"))
    poll = max(settings.scheduler.poll_interval, 1.0)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # kombu scans for abandoned messages every interval x throttle seconds; with
            # its default throttle of 10 a killed worker's task waits ~100 s beyond the
            # visibility window. Scan every interval instead (one cheap ZRANGEBYSCORE).
            "unacked_restore_interval": max(1.0, min(10.0, visibility / 4)),
            "unacked_restore_throttle": 1,
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        # Workers' events (received, started, succeeded) are what Flower shows; a "sent"
        # event per task would cost every sender one more PUBLISH for little.
        task_send_sent_event=False,
        task_default_queue=queue(pool, "assign"),
        task_queues=[Queue(queue(pool, kind)) for kind in KINDS],
        task_routes={name: {"queue": queue(pool, kind)} for name, kind in ROUTES.items()},
        # `celery -A migctl beat` as written gets redbeat (a lock: one beat per pool),
        # in a subclass that survives Redis restarts (migctl/worker/beat.py).
        beat_scheduler="migctl.worker.beat:MigctlScheduler",
        redbeat_redis_url=broker,
        redbeat_key_prefix=f"migctl:{{{pool}}}:redbeat",
        # One beat per pool: the standby blocks on redbeat's lock and polls it every
        # max_loop_interval; the holder renews it every tick. A dead holder's lock expires
        # after 4 s, so failover takes ~5 s: no longer than the shortest interval (sweep).
        redbeat_lock_timeout=4,
        beat_max_loop_interval=1,
        beat_schedule={
            "sweep": {"task": "migctl.sweep", "schedule": timedelta(seconds=poll * 5)},
            "reconcile": {"task": "migctl.reconcile", "schedule": timedelta(seconds=10)},
            "sync": {
                "task": "migctl.sync",
                "schedule": timedelta(seconds=settings.vm_manager.poll_interval),
            },
            "canary": {"task": "migctl.canary", "schedule": timedelta(seconds=15)},
            **(
                {"hygiene": {"task": "migctl.hygiene", "schedule": timedelta(seconds=hygiene_s)}}
                if (hygiene_s := settings.github_app.hygiene_interval)
                else {}
            ),
        },
        timezone="UTC",
    )
    import migctl.worker.signals  # (log redaction and ids in Celery logs)
    import migctl.worker.tasks  # noqa: F401  (registers the tasks on this app)

    return app


def get_app() -> Celery:
    global _app
    with _lock:
        if _app is None:
            from migctl.runtime import settings

            try:
                s = settings()
            except ConfigError as exc:
                print(str(exc), file=sys.stderr)
                raise SystemExit(2) from None
            _flower_defaults(s)
            _app = build_app(s)
        return _app


def _flower_defaults(settings: Settings) -> None:
    """`celery -A migctl flower` reads its options from FLOWER_* env vars; hand it the
    settings' values (env still wins). Without credentials Flower's UI would be open to
    anyone who can reach it, so it gets none of our defaults in that case and Flower's
    own rule applies (its API answers 401 unless FLOWER_UNAUTHENTICATED_API is set)."""
    if settings.flower.basic_auth:
        os.environ.setdefault("FLOWER_BASIC_AUTH", settings.flower.basic_auth)
    os.environ.setdefault("FLOWER_PORT", str(settings.flower.port))


def reset_app(app: Celery | None = None) -> None:
    """Forget the process's app, or install `app` as it (tests, embedded workers)."""
    global _app
    with _lock:
        _app = app


def send(name: str, *args: Any) -> None:
    get_app().send_task(name, args=list(args))
