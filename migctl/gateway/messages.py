"""Building and checking protocol messages: what the gateway sends, and the bounds it
puts on what agents send before it reaches the workers."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from migctl import __version__
from migctl.wire.miglet import commands_pb2 as pb

# The event types of PROTOCOL.md; anything else would only be logged by the workers.
EVENT_TYPES = frozenset(
    {
        "vm_started",
        "runner_registered",
        "job_started",
        "job_completed",
        "runner_crashed",
        "vm_shutting_down",
    }
)
# Events become Celery task arguments: bound what one agent message can put there.
MAX_EVENT_KEYS = 32
MAX_EVENT_BYTES = 16 * 1024
MAX_CAPABILITIES = 16
CAPABILITY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Agent ErrorNotifications logged per stream; the rest are counted only.
ERRORS_LOGGED = 5


def event_ok(kind: str, data: Mapping[str, str]) -> bool:
    """A protocol event type, with a data map small enough to be a task argument."""
    size = sum(len(k) + len(v) for k, v in data.items())
    return kind in EVENT_TYPES and len(data) <= MAX_EVENT_KEYS and size <= MAX_EVENT_BYTES


def capabilities(hello: pb.ConnectRequest) -> tuple[str, ...]:
    caps = [c for c in hello.capabilities[:MAX_CAPABILITIES] if CAPABILITY_RE.fullmatch(c)]
    return tuple(dict.fromkeys(caps))


def connect_ack(accepted: bool, message: str) -> pb.ControllerMessage:
    return pb.ControllerMessage(
        connect_ack=pb.ConnectAck(accepted=accepted, message=message, server_version=__version__)
    )


def error(code: str, message: str) -> pb.ControllerMessage:
    return pb.ControllerMessage(
        error=pb.ErrorNotification(code=code, message=message, timestamp=int(time.time()))
    )


def command_message(command: dict[str, Any]) -> pb.ControllerMessage:
    """An outbox entry (the JSON a worker wrote) as the wire's Command."""
    cmd = pb.Command(
        id=command["id"],
        type=command["type"],
        string_params=command.get("string_params", {}),
        int_params=command.get("int_params", {}),
        bool_params=command.get("bool_params", {}),
        string_array_params=command.get("string_array_params", []),
        created_at=int(command.get("created_at", 0)),
    )
    return pb.ControllerMessage(command=cmd)
