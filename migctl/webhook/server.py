"""The HTTP side of the ingress: POST /webhook (or /), GET /health and /stats.

The stdlib's threaded server. A body is bounded before it is read: a declared length over
the limit is refused (413) without reading it, and a client that stalls mid-request holds
its thread for at most the read timeout.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from migctl.domain.errors import TemporaryError
from migctl.webhook.ingress import Answer, Ingress, refused

log = logging.getLogger(__name__)

MAX_BODY = 25 * 1024 * 1024  # GitHub caps webhook payloads at 25 MB
READ_TIMEOUT_S = 10.0  # GitHub itself waits 10 s for an answer
MAX_CONCURRENT = 64  # requests handled at once; more get a quick 503
DRAIN_S = 1.0  # after an early 413, discard what the client still sends for this long
PATHS = ("/webhook", "/")


class WebhookServer(ThreadingHTTPServer):
    """Binds on construction; `start()` serves on a daemon thread, `shutdown()` stops."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        ingress: Ingress,
        max_body: int = MAX_BODY,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self.ingress = ingress
        self.max_body = max_body
        self.read_timeout_s = read_timeout_s
        self.max_concurrent = max_concurrent
        self.slots = threading.BoundedSemaphore(max_concurrent)
        # StreamRequestHandler applies its class attribute `timeout` to each connection.
        super().__init__(address, type("Handler", (_Handler,), {"timeout": read_timeout_s}))

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, args=(0.1,), name="webhook-http", daemon=True
        )
        thread.start()
        return thread

    def stop(self, grace_s: float = 8.0) -> bool:
        """Stop accepting, then wait up to `grace_s` for the requests in progress (idle
        keep-alive connections are not waited for). True when none was cut short."""
        self.shutdown()
        deadline = time.monotonic() + grace_s
        taken = 0
        while taken < self.max_concurrent:
            if not self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
            taken += 1
        self.server_close()
        return taken == self.max_concurrent


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"
    server_version = "migctl-webhook"

    def setup(self) -> None:
        super().setup()
        # The head and the body go out in two writes; without this, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("webhook http %s " + format, self.client_address[0], *args)

    # -- requests -------------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        # curl and others ask before sending a large body; refuse a too large one up front.
        answer = self._check_length()
        if answer is not None:
            self._refuse_early(answer)
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] not in PATHS:
            self._send(Answer(404, "refused", "not_found", f"POST {PATHS[0]}"), close=True)
            return
        if not self.server.slots.acquire(blocking=False):
            self._send(refused(503, "busy", "too many requests at once; retry"), close=True)
            return
        try:
            self._post()
        finally:
            self.server.slots.release()

    def _post(self) -> None:
        answer = self._check_length()
        if answer is not None:
            self._refuse_early(answer)
            return
        length = int(self.headers["Content-Length"])
        started = time.monotonic()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body = b""
        if len(body) < length:
            answer = refused(408, "incomplete_body", f"{len(body)} of {length} bytes arrived")
            self.server.ingress.count_refusal(answer)
            self._send(answer, close=True)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            answer = self.server.ingress.receive(headers, body)
        except Exception:  # a bug in a port: GitHub logs a failure, the catch-up retries it
            log.exception("BUG: webhook delivery %s failed", headers.get("x-github-delivery"))
            answer = refused(500, "internal_error", "see the webhook's log")
        self._send(answer)
        level = logging.INFO if answer.outcome == "refused" else logging.DEBUG
        log.log(
            level,
            "webhook %s from %s: %d %s%s in %.0f ms",
            headers.get("x-github-delivery", "-"),
            self.client_address[0],
            answer.status,
            answer.outcome,
            f" ({answer.reason})" if answer.reason else "",
            (time.monotonic() - started) * 1000,
        )

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/stats":
            try:
                self._json(200, {"counters": self.server.ingress.ledger.counters()})
            except TemporaryError as exc:
                self._json(503, {"error": str(exc)})
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    # -- helpers --------------------------------------------------------------------------

    def _check_length(self) -> Answer | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return refused(411, "length_required", "send a Content-Length")
        if not raw.strip().isdigit():
            return refused(400, "bad_length", "Content-Length is not a number")
        if int(raw) > self.server.max_body:
            return refused(413, "too_large", f"{int(raw)} bytes; at most {self.server.max_body}")
        return None

    def _refuse_early(self, answer: Answer) -> None:
        self.server.ingress.count_refusal(answer)
        log.info("webhook from %s: %d %s", self.client_address[0], answer.status, answer.reason)
        self._send(answer, close=True)
        self._discard_rest()

    def _discard_rest(self) -> None:
        """Read and drop what the client still sends, briefly, so it sees our answer instead of
        a reset (closing with unread bytes resets the connection). Nothing is kept."""
        deadline = time.monotonic() + DRAIN_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(256 * 1024):
                    break
        except OSError:
            pass

    def _send(self, answer: Answer, close: bool = False) -> None:
        self._json(answer.status, answer.body(), close)

    def _json(self, status: int, body: Any, close: bool = False) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
