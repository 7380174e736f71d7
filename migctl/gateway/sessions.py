"""The streams this gateway holds: one `Session` per VM, in a registry keyed by vm_id.

As in flwr's grpc_bidi, a session is registered once its agent is admitted and removed
when its stream ends, whatever the way (half-close, reset, cancellation, shutdown). A VM
that reconnects replaces its session; the old stream is ended, so a VM is never served
twice by one gateway.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from migctl.wire.miglet import commands_pb2 as pb

# (message, expires_at): a command past expires_at (its token is dead) is not sent.
Outbound = tuple[pb.ControllerMessage, float]


@dataclass(eq=False)
class Session:
    vm_id: str
    capabilities: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)
    outbound: asyncio.Queue[Outbound | None] = field(default_factory=asyncio.Queue)
    sent: set[str] = field(default_factory=set)  # command ids this stream was given
    state: str = ""  # the last miglet_state reported on this stream
    delivering: bool = False
    again: bool = False
    closed: bool = False
    # How the stream ends when the gateway ends it (None: OK, the agent half-closed).
    end_code: grpc.StatusCode | None = None
    end_details: str = ""
    errors_logged: int = 0

    def send(self, msg: pb.ControllerMessage, expires_at: float = 0.0) -> None:
        if not self.closed:
            self.outbound.put_nowait((msg, expires_at))

    def close(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        """End the stream once what is queued before is written. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.end_code, self.end_details = code, details
        self.outbound.put_nowait(None)


class Sessions:
    """vm_id -> the one live Session of that VM on this gateway."""

    def __init__(self) -> None:
        self._by_vm: dict[str, Session] = {}

    def add(self, session: Session) -> Session | None:
        """Register a session; end and return the one it replaces."""
        old = self._by_vm.get(session.vm_id)
        self._by_vm[session.vm_id] = session
        if old is not None:
            old.close(grpc.StatusCode.ABORTED, "replaced by a newer stream from this VM")
        return old

    def remove(self, session: Session) -> bool:
        """Unregister a session if it is still the VM's current one."""
        if self._by_vm.get(session.vm_id) is session:
            del self._by_vm[session.vm_id]
            return True
        return False

    def current(self, session: Session) -> bool:
        return self._by_vm.get(session.vm_id) is session

    def get(self, vm_id: str) -> Session | None:
        return self._by_vm.get(vm_id)

    def vm_ids(self) -> list[str]:
        return list(self._by_vm)

    def close_all(self, code: grpc.StatusCode, details: str) -> int:
        sessions = list(self._by_vm.values())
        for session in sessions:
            session.close(code, details)
        return len(sessions)

    def __len__(self) -> int:
        return len(self._by_vm)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_vm.values()))
