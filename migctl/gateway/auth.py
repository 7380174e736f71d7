"""Who may hold a stream: credentials per `server.auth_mode`, then pool membership.

Credentials first, so a stranger learns nothing about which VMs exist:
- `none`: no credentials (the deployed agents send none);
- `token`: `authorization: Bearer <server.agent_token>`, compared in constant time;
- `gce-identity`: `authorization: Bearer <GCE instance identity JWT>` naming this VM.
Then, in every mode, the VM must be one of this pool's.

A credential failure aborts the call with UNAUTHENTICATED: the agent retries later,
with a fresh identity token. A VM this pool does not serve gets
`connect_ack{accepted: false}`, which makes an agent stop for good.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from migctl.adapters.redis_store import RedisStore, StateEpoch
from migctl.gateway.identity import GOOGLE_CERTS_URL, IdentityRefused, IdentityVerifier
from migctl.settings import ConfigError, Settings
from migctl.wire.miglet import commands_pb2 as pb

log = logging.getLogger(__name__)

# GCE instance names are at most 63 characters; allow some room for other providers.
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Verdict:
    reason: str = ""  # counter name; empty = admitted
    message: str = ""  # what the agent is told
    status: grpc.StatusCode | None = None  # None: connect_ack{accepted: false}

    @property
    def ok(self) -> bool:
        return not self.reason


ADMITTED = Verdict()


def _unauthenticated(reason: str, message: str) -> Verdict:
    return Verdict(reason, message, grpc.StatusCode.UNAUTHENTICATED)


class Authenticator:
    """Decides admission for one `connect`. Blocking (Redis, certs): run it off the loop."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        verifier: IdentityVerifier | None = None,
        certs_url: str = GOOGLE_CERTS_URL,
    ) -> None:
        self.settings = settings
        self.store = store
        self.mode = settings.server.auth_mode
        # Notices a wiped Redis (shared with the gateway's loop, which ends the streams);
        # for a while after one, an unknown VM is told to retry, not refused.
        self.epoch = StateEpoch(store)
        self.rebuild_grace = max(60.0, 3 * settings.vm_manager.poll_interval)
        self.verifier = verifier
        if self.mode == "gce-identity" and verifier is None:
            if not settings.server.identity_audience:
                raise ConfigError(
                    "config error: server.identity_audience (env "
                    "CONTROLLER_SERVER_IDENTITY_AUDIENCE): required when server.auth_mode "
                    "is gce-identity"
                )
            self.verifier = IdentityVerifier(
                settings.server.identity_audience,
                settings.gcp.project_id,
                settings.gcp.zone,
                first_use=self.first_use,
                certs_url=certs_url,
            )
        if self.mode == "gce-identity" and not (settings.gcp.project_id and settings.gcp.zone):
            log.warning(
                "auth_mode gce-identity without gcp.project_id and gcp.zone: identity tokens "
                "of instances in any project or zone are accepted (the VM must still be a "
                "member of this pool)"
            )
        if self.verifier is not None and self.verifier.first_use is None:
            self.verifier.first_use = self.first_use

    def admit(self, hello: pb.ConnectRequest, metadata: Mapping[str, str]) -> Verdict:
        vm_id = hello.vm_id
        if not _VM_ID.fullmatch(vm_id):
            return Verdict("protocol", "connect needs a vm_id (the instance name)")
        bearer = _bearer(metadata)
        if self.mode == "token":
            want = self.settings.server.agent_token.encode()
            if not want or not hmac.compare_digest(bearer.encode(), want):
                return _unauthenticated("unauthenticated", "a valid bearer token is required")
        elif self.mode == "gce-identity":
            assert self.verifier is not None
            try:
                self.verifier.verify(bearer, vm_id)
            except IdentityRefused as exc:
                status = grpc.StatusCode.UNAVAILABLE if exc.retryable else None
                return Verdict(exc.reason, exc.message, status or grpc.StatusCode.UNAUTHENTICATED)
        pool = self.settings.pool.id
        if hello.pool_id and hello.pool_id != pool:
            return Verdict("wrong_pool", f"pool {hello.pool_id!r} is not served here ({pool!r})")
        if self.store.get_vm(vm_id) is None:
            if self.rebuilding():
                # The state was just lost: the sync may not have listed it yet.
                return Verdict(
                    "unknown_vm",
                    f"VM {vm_id!r} not known yet: the controller is rebuilding its state; retry",
                    grpc.StatusCode.UNAVAILABLE,
                )
            return Verdict("unknown_vm", f"unknown VM {vm_id!r}: not a member of pool {pool!r}")
        return ADMITTED

    def rebuilding(self) -> bool:
        """The state was lost lately, so the sync may not have listed this VM yet."""
        self.epoch.check()  # a wipe the gateway's loop has not looked for yet
        return time.time() < self.epoch.reset_at + self.rebuild_grace

    def first_use(self, digest: str, expires_at: float) -> bool:
        """Remember a token until it expires; False if it was seen already (any replica)."""
        key = self.store.k.prefix + "idtoken:" + digest
        return bool(self.store.r.set(key, "1", nx=True, exat=max(int(expires_at) + 1, 1)))


def _bearer(metadata: Mapping[str, str]) -> str:
    value = str(metadata.get("authorization", ""))
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
