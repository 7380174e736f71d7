"""The gRPC side of the gateway: channel options, TLS credentials, method registration.

Keepalive, for the deployed agents (PROTOCOL.md: grpc-go, pings every 10 s with
PermitWithoutStream, 3 s timeout). C-core's server default accepts one ping per 5 min
without data and sends GOAWAY `too_many_pings` after 2 strikes; with
`keepalive_permit_without_calls=0` a connection without streams is held to one ping
per 2 h whatever the interval (ping_abuse_policy.cc). So: permit without calls, accept
a ping every 5 s (half the agents' period, for timer jitter), and no strike limit at
all: a deployed agent is never dropped for pinging. Ping floods stay bounded by C-core's
limit on unanswered induced frames. The server pings too (every 30 s, 10 s to answer),
so a VM that vanished without a FIN frees its session within 40 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from migctl.settings import ConfigError, Settings
from migctl.wire.miglet import commands_pb2 as pb

SERVICE = "miglet.commands.CommandService"
METHOD = f"/{SERVICE}/StreamCommands"

KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # C-core's name for the server's minimum interval between received pings.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

# A burst of thousands of reconnecting agents must queue, not be refused: past ~2,500
# calls arriving at once the aio server otherwise fails them (FACTS F.1).
PENDING_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    size = settings.server.max_message_bytes
    return [
        *KEEPALIVE_OPTIONS,
        *PENDING_OPTIONS,
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # C-core sets SO_REUSEPORT by default: a second gateway on the same port would
        # silently take half the new connections. Fail at startup instead.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from `server.tls_*`; mTLS (client certs required) when a client CA is set."""
    srv = settings.server
    if not (srv.tls_cert_file or srv.tls_key_file or srv.tls_client_ca_file):
        return None
    if not (srv.tls_cert_file and srv.tls_key_file):
        raise ConfigError(
            "config error: server.tls_cert_file and server.tls_key_file: "
            "both are required for TLS (and for mTLS with server.tls_client_ca_file)"
        )

    def read(name: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"config error: server.{name}: cannot read {path}: {exc}") from exc

    cert = read("tls_cert_file", srv.tls_cert_file)
    key = read("tls_key_file", srv.tls_key_file)
    ca = read("tls_client_ca_file", srv.tls_client_ca_file) if srv.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class Malformed:
    """A frame that is not a MIGletMessage. Handed to the servicer instead of raising in
    the deserializer, so the gateway counts it and answers instead of logging a trace."""

    def __init__(self, error: str) -> None:
        self.error = error


def parse(data: bytes) -> pb.MIGletMessage | Malformed:
    try:
        return pb.MIGletMessage.FromString(data)
    except Exception as exc:  # DecodeError, or a recursion limit on nested junk
        return Malformed(f"{type(exc).__name__}: {str(exc)[:100]}")


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {
        "StreamCommands": grpc.stream_stream_rpc_method_handler(
            servicer.StreamCommands,
            request_deserializer=parse,
            response_serializer=pb.ControllerMessage.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
