"""`migctl-grpc-gateway`: the MIGlet gRPC gateway plus the operator HTTP endpoints."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal

from migctl.entry import add_config_flag, start
from migctl.settings import ConfigError, Settings

log = logging.getLogger("migctl.gateway")

# Beyond the stream grace: the final flush, the stats withdrawal, the HTTP server.
STUCK_STOP_S = 10.0


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    from migctl import runtime as rt
    from migctl.gateway.app import SHUTDOWN_GRACE_S, build, tune_gc
    from migctl.http.server import serve as serve_http
    from migctl.worker.dispatch import CeleryDispatcher

    rt.use_settings(settings)
    runtime = rt.runtime()
    dispatch = CeleryDispatcher(settings)
    app = build(
        settings,
        runtime.store,
        runtime.events,
        lambda name, *args: dispatch.send(name, *args),
        settings.redis.jobs.url(),
    )
    gateway = app.gateway
    await app.start()
    tune_gc()

    def gateway_check() -> str:
        return "" if gateway.accepting else "shutting down"

    http = serve_http(runtime.store, settings.server.bind, settings.server.http_port, gateway_check)
    log.info(
        "gateway %s listening on %s (gRPC, %s, auth %s) and :%d (HTTP)",
        gateway.id,
        app.address,
        "TLS" if app.credentials else "plaintext",
        settings.server.auth_mode,
        settings.server.http_port,
    )
    await stop.wait()
    log.info("gateway %s stopping: %d streams", gateway.id, len(gateway.sessions))
    # A stop that outlives its grace by far is stuck: print every thread's stack (to
    # stderr, the process log) and exit 1, rather than wait for the supervisor's SIGKILL.
    faulthandler.dump_traceback_later(SHUTDOWN_GRACE_S + STUCK_STOP_S, exit=True)
    try:
        await app.stop(SHUTDOWN_GRACE_S)
    finally:
        await asyncio.to_thread(http.shutdown)
    faulthandler.cancel_dump_traceback_later()
    log.info("gateway %s stopped", gateway.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migctl-grpc-gateway", description=__doc__)
    add_config_flag(parser)
    args = parser.parse_args(argv)
    settings = start(args.config)
    if settings is None:
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(run())
    except ConfigError as exc:
        print(exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
