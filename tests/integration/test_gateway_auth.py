"""Admission by `server.auth_mode` and the gateway's TLS/mTLS, over real grpc.aio.

GCE identity tokens are signed with a local RSA key; the certs are served by a local
HTTP server standing in for https://www.googleapis.com/oauth2/v1/certs (FACTS F.5).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from migctl.adapters.redis_store import RedisStore
from migctl.gateway.auth import Authenticator
from migctl.gateway.identity import IdentityVerifier
from migctl.gateway.testing import (
    DeployedLikeAgent,
    IdentityIssuer,
    add_vm,
    assert_no_leaks,
    make_certs,
    running_gateway,
    settings_for,
)
from migctl.gateway.transport import server_credentials
from migctl.settings import Settings

pytestmark = pytest.mark.integration

AUDIENCE = "https://gateway.migctl.example"
GCP = {"project_id": "test-project", "zone": "us-central1-a", "mig_name": "runners"}


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, "pool-a")
    add_vm(store, "vm-1")
    add_vm(store, "vm-2")
    yield store
    client.close()


@pytest.fixture
def issuer() -> Iterator[IdentityIssuer]:
    issuer = IdentityIssuer().start()
    yield issuer
    issuer.stop()


def identity_settings() -> Settings:
    s = settings_for("pool-a", auth_mode="gce-identity", identity_audience=AUDIENCE)
    return s.model_copy(update={"gcp": s.gcp.model_copy(update=GCP)})


async def attempt(port: int, vm_id: str, **kw: object) -> DeployedLikeAgent:
    agent = DeployedLikeAgent(f"127.0.0.1:{port}", vm_id, **kw)  # type: ignore[arg-type]
    await agent.connect()
    return agent


# -- token ------------------------------------------------------------------------------------


def test_token_mode(redis_url: str, store: RedisStore) -> None:
    settings = settings_for("pool-a", auth_mode="token", agent_token="s3cret-token")

    async def scenario() -> None:
        async with running_gateway(settings, redis_url) as app:
            good = await attempt(app.port, "vm-1", token="s3cret-token")
            assert good.connect_ack is not None and good.connect_ack.accepted
            for token in ("", "s3cret-tokem", "s3cret-token-and-more"):
                bad = await attempt(app.port, "vm-2", token=token)
                assert bad.connect_ack is None, token
                assert bad.status == grpc.StatusCode.UNAUTHENTICATED
                await bad.drop()
            # A valid token does not make a stranger a member of the pool.
            stranger = await attempt(app.port, "vm-404", token="s3cret-token")
            assert stranger.connect_ack is not None and not stranger.connect_ack.accepted
            assert app.gateway.stats.refused == {"unauthenticated": 3, "unknown_vm": 1}
            assert [s.vm_id for s in app.gateway.sessions] == ["vm-1"]
            await stranger.drop()
            await good.close()

    asyncio.run(scenario())
    assert_no_leaks()


# -- gce-identity -----------------------------------------------------------------------------


def test_gce_identity(redis_url: str, store: RedisStore, issuer: IdentityIssuer) -> None:
    settings = identity_settings()
    verifier = IdentityVerifier(
        AUDIENCE, GCP["project_id"], GCP["zone"], certs_url=issuer.certs_url
    )
    auth = Authenticator(settings, store, verifier)

    async def scenario() -> None:
        async with running_gateway(settings, redis_url, auth=auth) as app:
            port = app.port
            token = issuer.mint("vm-1", audience=AUDIENCE)
            good = await attempt(port, "vm-1", token=token)
            assert good.connect_ack is not None and good.connect_ack.accepted
            await good.close()

            refused = {
                "replayed": (token, "vm-1", "already used"),
                "spoofed vm_id": (
                    issuer.mint("vm-2", audience=AUDIENCE),
                    "vm-1",
                    "is for instance 'vm-2'",
                ),
                "wrong audience": (
                    issuer.mint("vm-1", audience="https://someone-else.example"),
                    "vm-1",
                    "rejected",
                ),
                "expired": (
                    issuer.mint("vm-1", audience=AUDIENCE, issued_at=time.time() - 7200),
                    "vm-1",
                    "expired",
                ),
                "other project": (
                    issuer.mint("vm-1", audience=AUDIENCE, project_id="someone-elses"),
                    "vm-1",
                    "project_id",
                ),
                "not a token": ("not-a-jwt", "vm-1", "rejected"),
                "none": ("", "vm-1", "required"),
            }
            for case, (tok, vm_id, why) in refused.items():
                agent = await attempt(port, vm_id, token=tok)
                assert agent.connect_ack is None, case
                assert agent.status == grpc.StatusCode.UNAUTHENTICATED, case
                assert why in agent.details, (case, agent.details)
                await agent.drop()
            assert app.gateway.stats.refused == {
                "identity_replayed": 1,
                "identity_mismatch": 2,
                "identity_invalid": 2,
                "identity_expired": 1,
                "no_credentials": 1,
            }
            # A fresh token for each connect works; the certs were fetched once for all.
            for vm_id in ("vm-1", "vm-2", "vm-1"):
                again = await attempt(port, vm_id, token=issuer.mint(vm_id, audience=AUDIENCE))
                assert again.connect_ack is not None and again.connect_ack.accepted
                await again.close()
        assert issuer.fetches == 1
        # Replay protection is shared by replicas: the token is remembered in Redis.
        assert len(store.r.keys(store.k.prefix + "idtoken:*")) == 4

    asyncio.run(scenario())
    assert_no_leaks()


def test_gce_identity_needs_an_audience(store: RedisStore) -> None:
    from migctl.settings import ConfigError

    settings = settings_for("pool-a", auth_mode="gce-identity")
    with pytest.raises(ConfigError, match=r"server\.identity_audience"):
        Authenticator(settings, store)


# -- TLS --------------------------------------------------------------------------------------


def write_certs(tmp_path: Path) -> dict[str, bytes]:
    certs = make_certs()
    for name, pem in certs.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    return certs


def test_tls_and_plain_client_refused(redis_url: str, store: RedisStore, tmp_path: Path) -> None:
    certs = write_certs(tmp_path)
    settings = settings_for(
        "pool-a",
        tls_cert_file=str(tmp_path / "server_cert.pem"),
        tls_key_file=str(tmp_path / "server_key.pem"),
    )

    async def scenario() -> None:
        async with running_gateway(settings, redis_url) as app:
            tls = grpc.ssl_channel_credentials(certs["ca"])
            good = await attempt(app.port, "vm-1", credentials=tls)
            assert good.connect_ack is not None and good.connect_ack.accepted
            plain = await attempt(app.port, "vm-2")
            assert plain.connect_ack is None and plain.status == grpc.StatusCode.UNAVAILABLE
            assert [s.vm_id for s in app.gateway.sessions] == ["vm-1"]
            await plain.drop()
            await good.close()

    asyncio.run(scenario())
    assert_no_leaks()


def test_mtls(redis_url: str, store: RedisStore, tmp_path: Path) -> None:
    certs = write_certs(tmp_path)
    settings = settings_for(
        "pool-a",
        tls_cert_file=str(tmp_path / "server_cert.pem"),
        tls_key_file=str(tmp_path / "server_key.pem"),
        tls_client_ca_file=str(tmp_path / "ca.pem"),
    )

    async def scenario() -> None:
        async with running_gateway(settings, redis_url) as app:
            mtls = grpc.ssl_channel_credentials(
                certs["ca"], certs["client_key"], certs["client_cert"]
            )
            good = await attempt(app.port, "vm-1", credentials=mtls)
            assert good.connect_ack is not None and good.connect_ack.accepted
            no_cert = await attempt(
                app.port, "vm-2", credentials=grpc.ssl_channel_credentials(certs["ca"])
            )
            assert no_cert.connect_ack is None
            assert no_cert.status == grpc.StatusCode.UNAVAILABLE
            await no_cert.drop()
            await good.close()

    asyncio.run(scenario())
    assert_no_leaks()


def test_tls_settings_errors_name_the_setting(tmp_path: Path) -> None:
    from migctl.settings import ConfigError

    with pytest.raises(ConfigError, match="tls_key_file"):
        server_credentials(settings_for("pool-a", tls_cert_file=str(tmp_path / "c.pem")))
    with pytest.raises(ConfigError, match=r"server.tls_cert_file: cannot read"):
        server_credentials(
            settings_for(
                "pool-a",
                tls_cert_file=str(tmp_path / "missing.pem"),
                tls_key_file=str(tmp_path / "missing.pem"),
            )
        )


# -- a wiped Redis ------------------------------------------------------------------------------


def test_after_a_wipe_streams_end_and_unknown_vms_are_told_to_retry(
    redis_url: str, store: RedisStore
) -> None:
    settings = settings_for("pool-a")

    async def scenario() -> None:
        async with running_gateway(settings, redis_url) as app:
            held = await attempt(app.port, "vm-1")
            assert held.connect_ack is not None and held.connect_ack.accepted
            # Before any wipe an unknown VM is refused for good.
            stranger = await attempt(app.port, "vm-404")
            assert stranger.connect_ack is not None and not stranger.connect_ack.accepted
            await stranger.drop()

            store.r.flushall()  # the records, the sessions and the state epoch go
            await asyncio.wait_for(held.ended.wait(), 10)
            assert held.status == grpc.StatusCode.UNAVAILABLE, held.details
            assert "state was reset" in held.details

            # Its VM is not listed again yet: the agent is told to retry, not refused.
            again = await attempt(app.port, "vm-1")
            assert again.connect_ack is None and again.status == grpc.StatusCode.UNAVAILABLE
            assert "rebuilding" in again.details
            await again.drop()

            add_vm(store, "vm-1")  # the GCloud sync lists it again
            back = await attempt(app.port, "vm-1")
            assert back.connect_ack is not None and back.connect_ack.accepted
            assert store.counters().get("state_resets") == 1
            await back.close()

    asyncio.run(scenario())
    assert_no_leaks()
