"""A gateway with its gRPC server: listen, serve, and stop gracefully.

Graceful stop (SIGTERM): the server stops taking calls and sends GOAWAY, every stream is
ended with UNAVAILABLE so its agent reconnects (through the load balancer, to another
replica), the disconnects and the last heartbeats are written, all within `grace`
seconds; streams still open then are cut.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

import grpc

from migctl.adapters.redis_store import RedisStore
from migctl.gateway.auth import Authenticator
from migctl.gateway.relay import Relay
from migctl.gateway.server import Gateway
from migctl.gateway.transport import add_to_server, server_credentials, server_options
from migctl.services.events import AgentEvents
from migctl.settings import ConfigError, Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0


class GatewayServer:
    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        *,
        address: str = "",
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.address = address or f"{settings.server.bind}:{settings.server.grpc_port}"
        self.credentials = credentials
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        server = grpc.aio.server(options=server_options(self.settings))
        add_to_server(self.gateway, server)
        creds = self.credentials
        try:
            port: int = (
                server.add_secure_port(self.address, creds)
                if creds
                else server.add_insecure_port(self.address)
            )
        except RuntimeError:  # grpcio raises where older versions returned 0
            port = 0
        if not port:
            await self.gateway.redis.aclose()
            self.gateway.relay.close()
            raise ConfigError(f"config error: server.grpc_port: cannot listen on {self.address}")
        await server.start()
        await self.gateway.start_background()
        self.server, self.port = server, port
        return port

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        stopping = asyncio.create_task(server.stop(grace))
        try:
            await self.gateway.shutdown(grace)
        finally:
            await stopping
            self.gateway.relay.close()


# Each stream keeps ~75 GC-tracked objects (grpc's and ours) alive; every read leaves a
# few more that live until the agent's next message (15 s). With the default threshold
# (700) they are promoted and rescanned by gen-1 collections of 10^5..10^6 objects.
# Measured at 10,000 streams: the event loop's worst stall in a 20 s window went from
# 139 ms (a gen-1 collection) to 21 ms, with no full collection in either window.
GC_THRESHOLDS = (50_000, 50, 10)


def tune_gc() -> None:
    """For a gateway process, once, before the first stream: keep the objects of startup
    (modules, settings, clients: ~90k) out of every later collection (measured at 2,000
    streams: full collections from ~150-1,300 ms down to ~60-130 ms), and collect the
    young generations less often. Not for tests: frozen garbage is never collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def build(
    settings: Settings,
    store: RedisStore,
    events: AgentEvents,
    send_task: Callable[..., Any],
    redis_url: str,
    *,
    auth: Authenticator | None = None,
    address: str = "",
    credentials: grpc.ServerCredentials | None = None,
    gateway_id: str = "",
    tls_from_settings: bool = True,
) -> GatewayServer:
    """The composition the entry point uses; tests pass their own store and send_task."""
    relay = Relay(settings, store, events, send_task)
    gateway = Gateway(settings, relay, redis_url, auth=auth, gateway_id=gateway_id)
    if credentials is None and tls_from_settings:
        credentials = server_credentials(settings)
    return GatewayServer(settings, gateway, address=address, credentials=credentials)
