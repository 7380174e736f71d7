"""The gateway's pure parts: the session registry, frame parsing, the certs cache, the
identity checks (with a fake transport), counters, options."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import pytest
from google.auth import exceptions as auth_exceptions

from migctl.gateway.identity import CachingRequest, IdentityRefused, IdentityVerifier
from migctl.gateway.messages import capabilities as _capabilities
from migctl.gateway.sessions import Session, Sessions
from migctl.gateway.stats import GatewayStats
from migctl.gateway.testing import IdentityIssuer, settings_for
from migctl.gateway.transport import Malformed, parse, server_options
from migctl.wire.miglet import commands_pb2 as pb

# -- sessions ---------------------------------------------------------------------------------


def test_one_session_per_vm_and_replacement_ends_the_old() -> None:
    async def scenario() -> None:
        reg = Sessions()
        old, new = Session("vm-1"), Session("vm-1")
        assert reg.add(old) is None
        assert reg.add(new) is old
        assert old.closed and old.end_code == grpc.StatusCode.ABORTED
        assert await old.outbound.get() is None
        assert len(reg) == 1 and reg.get("vm-1") is new
        assert not reg.remove(old)  # the old stream ending must not drop the new session
        assert reg.current(new) and reg.remove(new) and len(reg) == 0

    asyncio.run(scenario())


def test_close_is_idempotent_and_stops_sends() -> None:
    async def scenario() -> None:
        session = Session("vm-1")
        session.send(pb.ControllerMessage())
        session.close(grpc.StatusCode.UNAVAILABLE, "bye")
        session.close()
        session.send(pb.ControllerMessage())
        assert session.outbound.qsize() == 2  # the message before the close, then the end
        assert session.end_code == grpc.StatusCode.UNAVAILABLE and session.end_details == "bye"

    asyncio.run(scenario())


def test_close_all() -> None:
    async def scenario() -> None:
        reg = Sessions()
        sessions = [Session(f"vm-{i}") for i in range(3)]
        for s in sessions:
            reg.add(s)
        assert reg.close_all(grpc.StatusCode.UNAVAILABLE, "shutting down") == 3
        assert all(s.closed and s.end_code == grpc.StatusCode.UNAVAILABLE for s in sessions)

    asyncio.run(scenario())


# -- frames and connect -----------------------------------------------------------------------


def test_parse_hands_malformed_frames_to_the_servicer() -> None:
    good = pb.MIGletMessage(heartbeat=pb.Heartbeat(vm_id="vm-1")).SerializeToString()
    assert isinstance(parse(good), pb.MIGletMessage)
    assert isinstance(parse(b"\xff\xff\xff\xff"), Malformed)
    unknown_oneof = bytes([0x9A, 0x06, 1, 0])  # field 99, length-delimited, 1 byte
    parsed = parse(unknown_oneof)
    assert isinstance(parsed, pb.MIGletMessage) and parsed.WhichOneof("message") is None


def test_capabilities_are_bounded() -> None:
    hello = pb.ConnectRequest(capabilities=["jit", "jit", "JIT", "x" * 100, "", "fast-path"])
    assert _capabilities(hello) == ("jit", "fast-path")
    assert _capabilities(pb.ConnectRequest()) == ()  # deployed agents send none


def test_server_options_permit_deployed_agent_pings() -> None:
    options = dict(server_options(settings_for(max_message_bytes=65536)))
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= 10_000 // 2
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.max_receive_message_length"] == 65536
    assert options["grpc.server.max_pending_requests"] >= 10_000


def test_stats_fields() -> None:
    stats = GatewayStats()
    stats.refuse("unknown_vm")
    stats.refuse("unknown_vm")
    stats.refuse("unauthenticated")
    fields = stats.fields(sessions=7)
    assert fields["sessions"] == "7" and fields["refused"] == "3"
    assert fields["refused:unknown_vm"] == "2" and fields["accepted"] == "0"


# -- the certs cache and identity checks ------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.status, self.data, self.headers = status, data, headers


class FakeTransport:
    """google-auth's Request interface over a dict; counts calls; can fail."""

    def __init__(self, body: dict[str, str], max_age: int = 600) -> None:
        self.body, self.max_age = body, max_age
        self.calls = 0
        self.fail = False

    def __call__(self, url: str, method: str = "GET", *args: Any, **kwargs: Any) -> FakeResponse:
        self.calls += 1
        if self.fail:
            raise auth_exceptions.TransportError("unreachable")  # type: ignore[no-untyped-call]
        headers = {"Cache-Control": f"public, max-age={self.max_age}"}
        return FakeResponse(200, json.dumps(self.body).encode(), headers)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_certs_are_cached_for_the_smaller_of_ttl_and_max_age() -> None:
    inner, clock = FakeTransport({"k1": "pem"}, max_age=600), Clock()
    request = CachingRequest(inner, ttl=3600, clock=clock)  # type: ignore[arg-type]
    for _ in range(5):
        assert json.loads(request("https://certs").data) == {"k1": "pem"}
    assert inner.calls == 1
    clock.now += 601
    request("https://certs")
    assert inner.calls == 2


def test_a_failed_refresh_keeps_the_old_certs() -> None:
    inner, clock = FakeTransport({"k1": "pem"}), Clock()
    request = CachingRequest(inner, ttl=60, clock=clock)  # type: ignore[arg-type]
    request("https://certs")
    clock.now += 61
    inner.fail = True
    assert json.loads(request("https://certs").data) == {"k1": "pem"}
    fresh = CachingRequest(inner, ttl=60, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(auth_exceptions.TransportError):
        fresh("https://certs")


def test_an_unknown_key_id_refreshes_at_most_once_a_minute() -> None:
    issuer = IdentityIssuer()
    inner, clock = FakeTransport({"old-key": "pem"}), Clock()
    request = CachingRequest(inner, clock=clock)  # type: ignore[arg-type]
    verifier = IdentityVerifier("aud", request=request, certs_url="https://certs")
    token = issuer.mint("vm-1", audience="aud")
    with pytest.raises(IdentityRefused):
        verifier.verify(token, "vm-1")
    clock.now += 61
    inner.body = issuer.certs  # Google rotated the new key in
    claims = verifier.verify(token, "vm-1")
    assert claims["google"]["compute_engine"]["instance_name"] == "vm-1"
    assert inner.calls == 2


def test_identity_refusals() -> None:
    issuer = IdentityIssuer()
    inner = FakeTransport(issuer.certs)
    used: set[str] = set()

    def first_use(digest: str, expires_at: float) -> bool:
        fresh = digest not in used
        used.add(digest)
        return fresh

    verifier = IdentityVerifier(
        "aud",
        "proj",
        "zone-a",
        first_use=first_use,
        request=CachingRequest(inner),  # type: ignore[arg-type]
        certs_url="https://certs",
    )
    good = issuer.mint("vm-1", audience="aud", project_id="proj", zone="zone-a")
    verifier.verify(good, "vm-1")
    cases = {
        good: "identity_replayed",
        issuer.mint("vm-1", audience="aud", project_id="proj", zone="zone-b"): "identity_mismatch",
        issuer.mint("vm-1", audience="aud", project_id="proj", zone="zone-a", issuer="evil"): (
            "identity_invalid"
        ),
        "": "no_credentials",
    }
    for token, reason in cases.items():
        with pytest.raises(IdentityRefused) as refused:
            verifier.verify(token, "vm-1")
        assert refused.value.reason == reason
    assert inner.calls == 1


def test_a_malformed_token_is_never_echoed() -> None:
    verifier = IdentityVerifier(
        "aud",
        request=CachingRequest(FakeTransport({})),  # type: ignore[arg-type]
        certs_url="https://certs",
    )
    secret = base64.b64encode(b"a static secret someone pasted").decode()
    with pytest.raises(IdentityRefused) as refused:
        verifier.verify(secret, "vm-1")
    assert secret not in refused.value.message
