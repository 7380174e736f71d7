"""Prometheus metrics of a pool, read from Redis at scrape time (a custom Collector).

Every value comes from the pool's Redis keys when Prometheus scrapes, never from
process-local counters, so any replica answers the same and several worker processes
are counted once. Dashboards should take `max by (pool)` over replicas, not `sum`.

Histograms (job wait, assignment duration) are folded into Redis by the scrape itself:
each finished job in the pool's `recent` index is observed once (a Lua script marks it
folded), so the buckets only grow and survive restarts, whichever replica is scraped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from migctl.adapters.redis_store import RedisStore
from migctl.bridge.ports import SOURCE_COUNTERS
from migctl.domain.model import JobState, VmState
from migctl.domain.states import ON_THE_WAY
from migctl.http.views import live_gateways
from migctl.services.events import VM_STARTUP_BUCKETS

log = logging.getLogger(__name__)

JOB_WAIT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ASSIGNMENT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
HISTOGRAMS = {
    # name: (job field ending the interval, buckets, help)
    "controller_job_wait_seconds": (
        "started_at",
        JOB_WAIT_BUCKETS,
        "Queue-to-start wait of finished jobs: started_at - received_at.",
    ),
    "controller_assignment_duration_seconds": (
        "assigned_at",
        ASSIGNMENT_BUCKETS,
        "Time from receipt to a VM reserved: assigned_at - received_at.",
    ),
}
# Observed at event time (migctl.services.events), not folded from job records.
OBSERVED_HISTOGRAMS = {
    "controller_vm_startup_seconds": (
        "",
        VM_STARTUP_BUCKETS,
        "VM startup: create/start/resume requested until its agent reported ready.",
    ),
}
SEED_GAUGES = ("queue_length", "connected_vms")
SEED_COUNTERS = ("assigned_jobs", "failed_jobs", "started_vms", "created_vms")
PROVIDER_ERRORS = "provider_errors_"
BRIDGE_FIELDS = SOURCE_COUNTERS
# Where the GitHub adapter would publish the last rate-limit headers it saw (see docs).
GITHUB_RATE_KEY = "gh:rate_limit"

# Every family this collector can expose (the GitHub ones only when that hash exists).
METRIC_NAMES = (
    *SEED_GAUGES,
    *SEED_COUNTERS,
    "controller_redis_up",
    "controller_vms",
    "controller_jobs",
    "controller_jobs_finished",
    "controller_pool_events",
    "controller_provider_errors",
    "controller_dead_letters",
    "controller_dead_letters_kept",
    "controller_state_reset_timestamp_seconds",
    "controller_registrations_in_flight",
    "controller_queue_head_wait_seconds",
    "controller_vm_oldest_starting_seconds",
    "controller_worker_canary_age_seconds",
    "controller_gateway_sessions",
    "controller_bridge_messages",
    *HISTOGRAMS,
    *OBSERVED_HISTOGRAMS,
    "controller_github_rate_limit_remaining",
    "controller_github_rate_limit_limit",
    "controller_github_rate_limit_reset_timestamp_seconds",
)

# Folds each finished job of `recent` into the histogram hash once.
# KEYS[1] recent zset, KEYS[2] folded zset, KEYS[3] histogram hash.
# ARGV[1] job key prefix, ARGV[2] JSON {name: [end_field, [bucket, ...]]}. Returns jobs folded.
FOLD_LUA = """
local recent = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local hists = cjson.decode(ARGV[2])
local folded = 0
for i = 1, #recent, 2 do
  local id, score = recent[i], recent[i + 1]
  if not redis.call('ZSCORE', KEYS[2], id) then
    for name, spec in pairs(hists) do
      local f = redis.call('HMGET', ARGV[1] .. id, 'received_at', spec[1])
      local from, to = tonumber(f[1] or ''), tonumber(f[2] or '')
      if from and to and from > 0 and to > 0 then
        local v = math.max(0, to - from)
        for _, le in ipairs(spec[2]) do
          if v <= le then redis.call('HINCRBY', KEYS[3], name .. ':' .. le, 1) end
        end
        redis.call('HINCRBY', KEYS[3], name .. ':count', 1)
        redis.call('HINCRBYFLOAT', KEYS[3], name .. ':sum', v)
      end
    end
    redis.call('ZADD', KEYS[2], score, id)
    folded = folded + 1
  end
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. oldest[2]) end
return folded
"""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _f(value: Any) -> float:
    try:
        return float(_s(value))
    except (TypeError, ValueError):
        return 0.0


def _go(bucket: float) -> str:
    # Prometheus' own spelling of a bucket bound (1.0, 0.25), as its clients print it.
    return repr(float(bucket))


def _le(bucket: float) -> str:
    # Lua's tostring of a JSON number: integral values print without ".0".
    return str(int(bucket)) if float(bucket).is_integer() else repr(bucket)


class PoolCollector(Collector):
    """One pool's metrics, labelled `pool`. Thread-safe: holds no state but the store."""

    def __init__(self, store: RedisStore, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock
        self._fold = store.r.register_script(FOLD_LUA)
        self._hist_key = store.k.prefix + "metrics:hist"
        self._folded_key = store.k.prefix + "metrics:folded"

    def describe(self) -> list[Metric]:
        return []  # registering must not touch Redis

    def collect(self) -> Iterator[Metric]:
        pool = self.store.pool_id
        up = GaugeMetricFamily(
            "controller_redis_up", "1 when the pool's Redis answered this scrape.", labels=["pool"]
        )
        try:
            families = list(self._families(pool))
        except Exception as exc:  # the scrape still answers, saying Redis is down
            log.warning("metrics scrape of pool %s failed: %s", pool, exc)
            up.add_metric([pool], 0)
            yield up
            return
        up.add_metric([pool], 1)
        yield up
        yield from families

    # -- families ---------------------------------------------------------------------------

    def _families(self, pool: str) -> Iterator[Metric]:
        store, k = self.store, self.store.k
        now = float(self.clock())
        self.fold()
        pipe = store.r.pipeline(transaction=False)
        pipe.hgetall(k.counters)
        pipe.zcard(k.queue)
        pipe.zcard(k.assigned)
        pipe.zcard(k.inflight)
        pipe.llen(k.deadletters)
        pipe.hgetall(k.prefix + "gateways")
        pipe.hgetall(k.prefix + "gateways:seen")
        pipe.get(k.prefix + "canary")
        pipe.hgetall(k.bridge_stats)
        pipe.hgetall(k.prefix + GITHUB_RATE_KEY)
        pipe.hgetall(self._hist_key)
        pipe.zrange(k.queue, 0, 0)
        (
            raw_counters,
            queued,
            assigned,
            inflight,
            dead_kept,
            raw_gateways,
            gateways_seen,
            canary,
            bridge,
            github,
            hist,
            head,
        ) = pipe.execute()
        counters = {_s(key): int(_f(v)) for key, v in raw_counters.items()}
        gateways = live_gateways(raw_gateways, gateways_seen, now)
        vms = [vm for vm, _ in store.get_vms()]

        # The seed's names, as written (untyped, so no `_total` is appended).
        yield _gauge("queue_length", "Jobs waiting in the queue.", pool, queued)
        yield _gauge(
            "connected_vms", "Agent streams held by the gateways.", pool, sum(gateways.values())
        )
        seed_help = {
            "assigned_jobs": "Total jobs assigned.",
            "failed_jobs": "Total failed jobs.",
            "started_vms": "VMs started from stopped or suspended.",
            "created_vms": "New VMs created.",
        }
        for name in SEED_COUNTERS:
            family = UnknownMetricFamily(name, seed_help[name], labels=["pool"])
            family.add_metric([pool], counters.get(name, 0))
            yield family

        by_state = {state.value: 0 for state in VmState}
        for vm in vms:
            by_state[vm.state.value] += 1
        yield _labelled(
            GaugeMetricFamily(
                "controller_vms", "VMs by effective state.", labels=["pool", "state"]
            ),
            pool,
            by_state,
        )
        running = len({vm.job_id for vm in vms if vm.job_id})
        yield _labelled(
            GaugeMetricFamily(
                "controller_jobs", "Jobs in an active state.", labels=["pool", "state"]
            ),
            pool,
            {
                JobState.QUEUED.value: queued,
                JobState.ASSIGNED.value: assigned,
                JobState.RUNNING.value: running,
            },
        )
        yield _labelled(
            CounterMetricFamily(
                "controller_jobs_finished", "Jobs that ended, by state.", labels=["pool", "state"]
            ),
            pool,
            {
                JobState.COMPLETED.value: counters.get("completed_jobs", 0),
                JobState.FAILED.value: counters.get("failed_jobs", 0),
                JobState.CANCELLED.value: counters.get("cancelled_jobs", 0),
            },
        )
        yield _labelled(
            CounterMetricFamily(
                "controller_pool_events",
                "Every counter of the pool's `counters` hash, by name.",
                labels=["pool", "event"],
            ),
            pool,
            {
                n: v
                for n, v in counters.items()
                if not n.startswith(PROVIDER_ERRORS) and n != "state_reset_at"
            },
        )
        yield _gauge(
            "controller_state_reset_timestamp_seconds",
            "When Redis was last found wiped (state_resets counts it); 0: never.",
            pool,
            counters.get("state_reset_at", 0),
        )
        yield _labelled(
            CounterMetricFamily(
                "controller_provider_errors",
                "VM provider (GCE) errors by kind.",
                labels=["pool", "kind"],
            ),
            pool,
            {
                n[len(PROVIDER_ERRORS) :]: v
                for n, v in counters.items()
                if n.startswith(PROVIDER_ERRORS)
            },
        )
        dead = CounterMetricFamily(
            "controller_dead_letters", "Messages the bridge dead-lettered.", labels=["pool"]
        )
        dead.add_metric([pool], counters.get("dead_letters", 0))
        yield dead
        yield _gauge(
            "controller_dead_letters_kept", "Dead letters kept for inspection.", pool, dead_kept
        )
        yield _gauge(
            "controller_registrations_in_flight",
            "register_runner commands sent and not yet acked.",
            pool,
            inflight,
        )
        head_wait = 0.0
        if head:
            received = store.r.hget(k.job(_s(head[0])), "received_at")
            head_wait = max(0.0, now - _f(received)) if _f(received) else 0.0
        yield _gauge(
            "controller_queue_head_wait_seconds",
            "How long the job at the head of the queue has waited (0 when empty).",
            pool,
            head_wait,
        )
        starting = [now - vm.state_since for vm in vms if vm.state in ON_THE_WAY and vm.state_since]
        yield _gauge(
            "controller_vm_oldest_starting_seconds",
            "Age of the oldest VM on its way up (STARTING, BOOTING, CONNECTING); 0 if none.",
            pool,
            max(starting, default=0.0),
        )
        yield _gauge(
            "controller_worker_canary_age_seconds",
            "Seconds since a worker last ran the canary task (NaN if never).",
            pool,
            now - _f(canary) if canary else math.nan,
        )
        sessions = GaugeMetricFamily(
            "controller_gateway_sessions",
            "Agent streams per gateway replica.",
            labels=["pool", "gateway"],
        )
        for gateway_id, n in sorted(gateways.items()):
            sessions.add_metric([pool, gateway_id], n)
        yield sessions
        bridge_fields = {_s(key): v for key, v in bridge.items()}
        yield _labelled(
            CounterMetricFamily(
                "controller_bridge_messages",
                "The bridge's message outcomes (since its last restart).",
                labels=["pool", "outcome"],
            ),
            pool,
            {n: int(_f(bridge_fields[n])) for n in BRIDGE_FIELDS if n in bridge_fields},
        )
        yield from self._histograms(pool, {_s(key): _f(v) for key, v in hist.items()})
        if github:
            yield from _github(pool, {_s(key): _s(v) for key, v in github.items()})

    def _histograms(self, pool: str, hist: dict[str, float]) -> Iterator[Metric]:
        for name, (_, buckets, text) in {**HISTOGRAMS, **OBSERVED_HISTOGRAMS}.items():
            family = HistogramMetricFamily(name, text, labels=["pool"])
            count = hist.get(f"{name}:count", 0.0)
            points = [(_go(b), hist.get(f"{name}:{_le(b)}", 0.0)) for b in buckets]
            family.add_metric(
                [pool], [*points, ("+Inf", count)], sum_value=hist.get(f"{name}:sum", 0.0)
            )
            yield family

    def fold(self) -> int:
        """Observe every finished job not observed yet; safe from any number of replicas."""
        spec = {name: [end, list(buckets)] for name, (end, buckets, _) in HISTOGRAMS.items()}
        k = self.store.k
        return int(
            self._fold(
                keys=[k.recent, self._folded_key, self._hist_key],
                args=[k.prefix + "job:", json.dumps(spec)],
            )
        )


def _gauge(name: str, text: str, pool: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=["pool"])
    family.add_metric([pool], float(value))
    return family


def _labelled(family: Any, pool: str, values: dict[str, Any]) -> Any:
    for label, value in sorted(values.items()):
        family.add_metric([pool, label], float(value))
    return family


def _github(pool: str, fields: dict[str, str]) -> Iterator[Metric]:
    resource = fields.get("resource", "") or "core"
    for key, name, text in (
        ("remaining", "controller_github_rate_limit_remaining", "GitHub API calls left."),
        ("limit", "controller_github_rate_limit_limit", "GitHub API calls per window."),
        (
            "reset",
            "controller_github_rate_limit_reset_timestamp_seconds",
            "When the GitHub rate-limit window resets (epoch seconds).",
        ),
    ):
        if key in fields:
            family = GaugeMetricFamily(name, text, labels=["pool", "resource"])
            family.add_metric([pool, resource], _f(fields[key]))
            yield family


def registry(store: RedisStore) -> CollectorRegistry:
    """A registry with the pool's collector only (no process or platform metrics: a
    replica's own numbers would not be the pool's)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PoolCollector(store))
    return reg
