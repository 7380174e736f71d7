"""`migctl-grpc-gateway`: the MIGlet gRPC gateway plus the operator HTTP endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc

from migctl.logs import setup_logging
from migctl.settings import ConfigError, Settings, load_settings
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

log = logging.getLogger("migctl.gateway")


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    srv = settings.server
    if not srv.tls_cert_file:
        return None
    key, cert = Path(srv.tls_key_file).read_bytes(), Path(srv.tls_cert_file).read_bytes()
    ca = Path(srv.tls_client_ca_file).read_bytes() if srv.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    from migctl import runtime as rt
    from migctl.gateway.server import Gateway, Relay, server_options
    from migctl.http.server import serve as serve_http

    rt.use_settings(settings)
    runtime = rt.runtime()
    from migctl.worker.dispatch import CeleryDispatcher

    dispatch = CeleryDispatcher(settings)
    relay = Relay(
        settings, runtime.store, runtime.events, lambda name, *args: dispatch.send(name, *args)
    )
    gateway = Gateway(settings, relay, settings.redis.jobs.url())
    server = grpc.aio.server(options=server_options(settings))
    pb_grpc.add_CommandServiceServicer_to_server(gateway, server)
    address = f"{settings.server.bind}:{settings.server.grpc_port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if not port:
        raise ConfigError(f"config error: server.grpc_port: cannot listen on {address}")
    await server.start()
    await gateway.start_background()
    http = serve_http(runtime.store, settings.server.bind, settings.server.http_port)
    log.info(
        "gateway listening on %s (gRPC, %s) and :%d (HTTP)",
        address,
        "TLS" if creds else "plaintext",
        settings.server.http_port,
    )
    await stop.wait()
    log.info("gateway stopping")
    http.shutdown()
    await gateway.stop_background()
    await server.stop(grace=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migctl-grpc-gateway", description=__doc__)
    parser.add_argument("--config", help="controller YAML (default: $MIGCTL_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc)
        return 2
    setup_logging(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
