"""The Celery floor of bench/pipeline_bench.py: migctl's own Celery app (the same broker,
queues, acks_late, prefetch, events), plus two tasks that do nothing of ours.

    celery -A bench.celery_floor worker -E -c N -Q migctl.<pool>.assign

`bench.noop` does nothing; `bench.stamp(sent)` pushes its start delay to a Redis list
(one round trip), for the floor of the pipeline's latency.
"""

from __future__ import annotations

import time

import redis

from migctl.worker.app import get_app

app = get_app()
STAMPS = "bench:floor:stamps"
_client: list[redis.Redis] = []


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.stamp")
def stamp(sent: float) -> None:
    started = time.time()
    if not _client:
        _client.append(redis.Redis.from_url(app.conf.broker_url))
    _client[0].rpush(STAMPS, repr(started - sent))
