"""The operator HTTP endpoints of the seed: /health, /ready, /stats (and /metrics).

A small threaded stdlib server, run inside the gateway process; every answer is read
from Redis, so it is right whatever process or replica did the work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from migctl.adapters.redis_store import RedisStore
from migctl.domain.model import JobState

log = logging.getLogger(__name__)

CANARY_MAX_AGE_S = 120.0
SEED_COUNTERS = ("assigned_jobs", "failed_jobs", "started_vms", "created_vms")


def stats(store: RedisStore) -> dict[str, Any]:
    """The seed's /stats fields plus pool and bridge detail."""
    counters = store.counters()
    vms = [vm for vm, _ in store.get_vms()]
    by_state: dict[str, int] = {}
    for vm in vms:
        by_state[vm.state.value] = by_state.get(vm.state.value, 0) + 1
    connected = sum(int(v) for v in store.r.hvals(store.k.prefix + "gateways") or [])
    out: dict[str, Any] = {
        "pool_id": store.pool_id,
        "queue_length": store.queue_length(),
        **{name: counters.get(name, 0) for name in SEED_COUNTERS},
        "connected_vms": connected,
        "pool_stats": {"total_vms": len(vms), "vms_by_state": by_state},
        "counters": counters,
        "bridge": store.bridge_stats(),
    }
    return out


def readiness(
    store: RedisStore, extra: Callable[[], str] | None = None
) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        store.r.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {exc}"
        return False, checks
    raw = store.r.get(store.k.prefix + "canary")
    age = time.time() - float(raw) if raw else None
    checks["worker"] = (
        "ok"
        if age is not None and age < CANARY_MAX_AGE_S
        else (
            "no worker has consumed the canary task"
            if age is None
            else f"canary last consumed {age:.0f}s ago"
        )
    )
    if extra:
        checks["gateway"] = extra() or "ok"
    return all(v == "ok" for v in checks.values()), checks


def job_counts(store: RedisStore) -> dict[str, int]:
    jobs = store.recent_jobs(limit=1000)
    counts = {state.value: 0 for state in JobState}
    for job in jobs:
        counts[job.state.value] += 1
    return counts


class _Handler(BaseHTTPRequestHandler):
    store: RedisStore
    gateway_check: Callable[[], str] | None = None

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet access log
        log.debug("http " + fmt, *args)

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body, indent=1).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/health":
                self._json(200, {"status": "ok"})
            elif path == "/ready":
                ok, checks = readiness(self.store, self.gateway_check)
                self._json(200 if ok else 503, {"ready": ok, "checks": checks})
            elif path == "/stats":
                self._json(200, stats(self.store))
            else:
                self._json(404, {"error": f"no such endpoint {path}"})
        except Exception as exc:
            log.exception("GET %s failed", path)
            self._json(503, {"error": str(exc)})


def serve(
    store: RedisStore, bind: str, port: int, gateway_check: Callable[[], str] | None = None
) -> ThreadingHTTPServer:
    handler = type(
        "Handler",
        (_Handler,),
        {"store": store, "gateway_check": staticmethod(gateway_check) if gateway_check else None},
    )
    server = ThreadingHTTPServer((bind, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
