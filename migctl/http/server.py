"""The operator HTTP server: the seed's /health /ready /stats, /metrics, the admin API
and the status page. Run inside the gateway process (`serve`).

The stdlib's threaded server, kept small: fixed routes, ids checked against a pattern,
bodies bounded, a read timeout per connection, a cap on requests handled at once. Every
answer is read from Redis, so it is right whatever process or replica did the work.
Writes (drain, cancel) need `Authorization: Bearer <server.admin_token>`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

from migctl.adapters.redis_store import RedisStore
from migctl.domain.errors import TemporaryError
from migctl.domain.model import JobState
from migctl.http import admin, views
from migctl.metrics import registry
from migctl.ports import Dispatcher
from migctl.settings import Settings

log = logging.getLogger(__name__)

CANARY_MAX_AGE_S = 120.0  # the canary runs every 15 s; a few missed runs mean no worker
REDIS_TIMEOUT_S = 2.0  # answer within a probe's patience even when Redis hangs
MAX_REDIS_CONNECTIONS = 16
READ_TIMEOUT_S = 10.0
MAX_BODY = 64 * 1024
MAX_CONCURRENT = 32
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
}
# The page loads its own script and style and fetches this origin only.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"


def readiness(
    store: RedisStore, gateway_check: Callable[[], str] | None = None
) -> tuple[bool, dict[str, str]]:
    """Redis reachable, a worker consumed the canary recently, the gateway serving.
    Each check is "ok" or a sentence naming what is wrong."""
    client = store.r
    checks: dict[str, str] = {}
    try:
        client.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {exc}"
        checks["worker"] = "unknown: Redis is unreachable"
    if checks["redis"] == "ok":
        try:
            raw = client.get(store.k.prefix + "canary")
            age = time.time() - float(raw) if raw else None
            if age is None:
                checks["worker"] = (
                    "no worker has consumed the canary task (beat sends it every 15 s: "
                    "are beat and a worker running?)"
                )
            elif age > CANARY_MAX_AGE_S:
                checks["worker"] = (
                    f"canary last consumed {age:.0f}s ago (> {CANARY_MAX_AGE_S:.0f}s)"
                )
            else:
                checks["worker"] = "ok"
        except (redis.RedisError, ValueError) as exc:
            checks["worker"] = f"unknown: {exc}"
    if gateway_check is not None:
        try:
            checks["gateway"] = gateway_check() or "ok"
        except Exception as exc:
            checks["gateway"] = f"check failed: {exc}"
    return all(v == "ok" for v in checks.values()), checks


def _own_client(client: redis.Redis) -> redis.Redis:
    """The store's connection settings with short timeouts, no retries and a pool of its
    own: an answer comes quickly when Redis is down, and HTTP load cannot take the
    connections the gateway's streams need."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    kwargs.pop("retry_on_error", None)
    return redis.Redis(
        connection_pool=redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            connection_class=pool.connection_class,
            max_connections=MAX_REDIS_CONNECTIONS,
            timeout=REDIS_TIMEOUT_S,
            **kwargs,
        )
    )


class Answer(Exception):
    """An early answer from deep in a handler (an error to report, with its status)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class OpsServer(ThreadingHTTPServer):
    """Binds on construction; `start()` serves on a daemon thread, `shutdown()` stops."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        store: RedisStore,
        settings: Settings,
        gateway_check: Callable[[], str] | None = None,
        dispatch: Dispatcher | None = None,
    ) -> None:
        self.redis = _own_client(store.r)
        self.store = RedisStore(self.redis, store.pool_id)
        self.settings = settings
        self.gateway_check = gateway_check
        self._dispatch = dispatch
        self.metrics = registry(self.store)
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        super().__init__(address, type("Handler", (_Handler,), {"timeout": READ_TIMEOUT_S}))

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def dispatch(self) -> Dispatcher | None:
        if self._dispatch is None:
            try:
                from migctl.runtime import runtime

                self._dispatch = runtime().dispatch
            except Exception as exc:  # no broker config: the queue sweep picks freed VMs up
                log.warning("no dispatcher for the admin API: %s", exc)
        return self._dispatch

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(0.2,), name="http", daemon=True)
        thread.start()
        return thread

    def server_close(self) -> None:
        super().server_close()
        self.redis.close()


class _Handler(BaseHTTPRequestHandler):
    server: OpsServer
    protocol_version = "HTTP/1.1"
    server_version = "migctl"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    # -- dispatch ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        if not self.server.slots.acquire(blocking=False):
            self._json(503, {"error": "too many requests at once; retry"}, close=True)
            return
        try:
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            try:
                self._route(method, path, query)
            except Answer as answer:
                self._json(answer.status, {"error": str(answer)}, headers=answer.headers)
            except admin.AdminError as exc:
                self._json(exc.status, {"error": str(exc)})
            except (TemporaryError, redis.RedisError) as exc:
                self._json(503, {"error": f"Redis unavailable: {exc}"})
            except Exception:
                log.exception("%s %s failed", method, path)
                self._json(500, {"error": "internal error; see the gateway's log"})
        finally:
            self.server.slots.release()

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if path in STATIC or path in ("/health", "/ready", "/stats", "/metrics"):
            self._allow(method, "GET")
            if path == "/health":
                self._json(200, {"status": "ok"})
            elif path == "/ready":
                ok, checks = readiness(self.server.store, self.server.gateway_check)
                failing = [name for name, text in checks.items() if text != "ok"]
                self._json(200 if ok else 503, {"ready": ok, "failing": failing, "checks": checks})
            elif path == "/stats":
                self._json(200, views.stats(self.server.store))
            elif path == "/metrics":
                self._send(200, generate_latest(self.server.metrics), CONTENT_TYPE_LATEST)
            else:
                self._static(*STATIC[path])
            return
        if parts[:2] != ["api", "v1"] or len(parts) < 4:
            raise Answer(404, f"no such endpoint {path}")
        kind, ident, rest = parts[2], parts[3], parts[4:]
        if not ID.fullmatch(ident):
            raise Answer(400, f"malformed id {ident[:80]!r}")
        store, now = self.server.store, time.time()
        if kind == "pools" and len(rest) == 1:
            self._allow(method, "GET")
            self._pool(self._pool_store(ident), rest[0], query, now)
        elif kind == "vms" and not rest:
            self._allow(method, "GET")
            detail = views.vm_detail(store, ident, now)
            if detail is None:
                raise Answer(404, f"no VM {ident} in pool {store.pool_id}")
            self._json(200, detail)
        elif kind == "vms" and rest == ["drain"]:
            self._allow(method, "POST")
            request = self._admin_body()
            drained = admin.drain_vm(store, self.server.settings, ident, now)
            log.info("drain of %s requested over HTTP (%s)", ident, request.get("reason", "-"))
            self._json(
                200 if drained.already else 202,
                {
                    "vm_id": drained.vm_id,
                    "state": "DRAINING",
                    "already_draining": drained.already,
                    "command_id": drained.command_id,
                },
            )
        elif kind == "jobs" and not rest:
            self._allow(method, "GET")
            story = views.explain(store, self.server.settings, ident, now)
            if story is None:
                raise Answer(404, f"no job {ident} in pool {store.pool_id}")
            self._json(200, story)
        elif kind == "jobs" and rest == ["cancel"]:
            self._allow(method, "POST")
            request = self._admin_body()
            reason = str(request.get("reason", ""))[:200]
            cancelled = admin.cancel_job(
                store, ident, reason=reason, now=now, dispatch=self.server.dispatch
            )
            self._json(
                200,
                {"job": views.job_view(cancelled.job, now), "freed_vms": list(cancelled.freed)},
            )
        else:
            raise Answer(404, f"no such endpoint {path}")

    def _pool(self, store: RedisStore, what: str, query: dict[str, list[str]], now: float) -> None:
        limit = self._int(query, "limit", 100)
        if what == "stats":
            self._json(200, views.stats(store, now))
        elif what == "vms":
            vm_states = self._list(query, "state")
            vms = [views.vm_view(vm, now) for vm, _ in store.get_vms()]
            if vm_states:
                vms = [vm for vm in vms if vm["state"] in vm_states]
            self._json(200, {"pool_id": store.pool_id, "vms": vms})
        elif what == "jobs":
            names = self._list(query, "state")
            try:
                states = [JobState(name) for name in names] or None
            except ValueError:
                raise Answer(
                    400, f"unknown job state in {names}; one of {[s.value for s in JobState]}"
                ) from None
            jobs = views.jobs(store, now, states, limit)
            self._json(200, {"pool_id": store.pool_id, "jobs": jobs})
        elif what == "deadletters":
            self._json(
                200,
                {"pool_id": store.pool_id, "dead_letters": views.dead_letters(store, limit)},
            )
        else:
            raise Answer(404, f"no such endpoint: pools/{store.pool_id}/{what}")

    # -- helpers ----------------------------------------------------------------------------

    def _pool_store(self, pool_id: str) -> RedisStore:
        """This server's pool, or another pool sharing its Redis (read-only)."""
        own = self.server.store
        if pool_id == own.pool_id:
            return own
        other = RedisStore(own.r, pool_id)
        k = other.k
        if not own.r.exists(k.counters, k.vms, k.queue, k.recent):
            raise Answer(404, f"no pool {pool_id} in this Redis (this server's is {own.pool_id})")
        return other

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise Answer(405, f"use {allowed} here", {"Allow": allowed})

    def _admin_body(self) -> dict[str, Any]:
        """Authorize an admin write, then read its optional JSON object body."""
        token = self.server.settings.server.admin_token
        if not token:
            raise Answer(
                403,
                "admin writes are disabled: set server.admin_token "
                "(CONTROLLER_SERVER_ADMIN_TOKEN) to enable them",
            )
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise Answer(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.isdigit():
            raise Answer(400, "Content-Length is not a number")
        length = int(raw_length)
        if length > MAX_BODY:
            self.close_connection = True
            raise Answer(413, f"body of {length} bytes; at most {MAX_BODY}")
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            self.close_connection = True
            raise Answer(400, "the body ended early")
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise Answer(400, f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Answer(400, 'body must be a JSON object, e.g. {"reason": "..."}')
        return body

    @staticmethod
    def _list(query: dict[str, list[str]], name: str) -> list[str]:
        return [v.strip().upper() for raw in query.get(name, []) for v in raw.split(",") if v]

    @staticmethod
    def _int(query: dict[str, list[str]], name: str, default: int) -> int:
        raw = query.get(name, [str(default)])[-1]
        if not raw.isdigit():
            raise Answer(400, f"{name} must be a positive integer")
        return max(1, min(int(raw), views.MAX_LIMIT))

    def _static(self, name: str, content_type: str) -> None:
        body = resources.files("migctl.http").joinpath("static", name).read_bytes()
        self._send(200, body, content_type, extra={"Content-Security-Policy": CSP})

    def _json(
        self, status: int, body: Any, close: bool = False, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body, indent=1, default=str).encode() + b"\n"
        # After an error the request's body may be unread: do not parse it as a request.
        self._send(status, data, "application/json", close=close or status >= 400, extra=headers)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        close: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="migctl"')
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def serve(
    store: RedisStore,
    bind: str,
    port: int,
    gateway_check: Callable[[], str] | None = None,
    *,
    settings: Settings | None = None,
    dispatch: Dispatcher | None = None,
) -> OpsServer:
    """Start the server on a daemon thread. `settings` defaults to the process's (the
    gateway sets them); `dispatch` to its Celery dispatcher, made on first use."""
    if settings is None:
        from migctl.runtime import settings as process_settings

        settings = process_settings()
    server = OpsServer((bind, port), store, settings, gateway_check, dispatch)
    server.start()
    return server
