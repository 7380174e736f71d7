"""The GitHub App's JWT and key handling, without a network: claims, bounds, error text."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis import Redis

from migctl.adapters.github import (
    GithubApp,
    load_app_key,
    make_app_jwt,
    parse_time,
    token_cipher,
)
from migctl.domain.errors import PermanentError
from migctl.settings import GithubAppSettings
from migctl.sim.keys import generate_app_key

NOW = 1_767_225_600.75  # 2026-01-01T00:00:00.75Z


@pytest.fixture(scope="module")
def keypair() -> tuple[bytes, bytes]:
    return generate_app_key()


def _app(**settings: object) -> GithubApp:
    # The client object never connects: nothing here talks to Redis.
    fields = {"app_id": "12345", **settings}
    return GithubApp(GithubAppSettings(**fields), Redis(port=1), pool_id="p")  # type: ignore[arg-type]


def _decode(token: str, public_pem: bytes) -> dict[str, object]:
    return jwt.decode(
        token, public_pem, algorithms=["RS256"], options={"verify_exp": False, "verify_iat": False}
    )


def test_jwt_claims_follow_githubs_rules(keypair: tuple[bytes, bytes]) -> None:
    private_pem, public_pem = keypair
    key = load_app_key(GithubAppSettings(private_key=private_pem.decode()))
    token = make_app_jwt("12345", key, NOW)
    claims = _decode(token, public_pem)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert claims == {"iat": int(NOW) - 60, "exp": int(NOW) + 540, "iss": "12345"}


@pytest.mark.parametrize("now", [0.0, 59.999, NOW, NOW + 0.999, 4_102_444_800.5])
def test_jwt_lifetime_stays_under_githubs_ten_minutes(
    keypair: tuple[bytes, bytes], now: float
) -> None:
    private_pem, public_pem = keypair
    key = load_app_key(GithubAppSettings(private_key=private_pem.decode()))
    claims = _decode(make_app_jwt("Iv1.abc", key, now), public_pem)
    assert claims["iat"] < now  # backdated against clock drift
    assert claims["exp"] - claims["iat"] <= 600  # type: ignore[operator]
    assert claims["exp"] <= now + 540  # type: ignore[operator]


def test_missing_key_file_names_the_setting_and_env(tmp_path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(PermanentError) as err:
        _app(private_key_path=str(path)).check_key()
    text = str(err.value)
    assert "github_app.private_key_path" in text
    assert "GITHUB_APP_PRIVATE_KEY_PATH" in text
    assert str(path) in text
    assert "\n" not in text


def test_no_key_configured(tmp_path) -> None:
    with pytest.raises(PermanentError, match=r"github_app\.private_key_path .*not set"):
        _app().check_key()


def test_missing_app_id(keypair: tuple[bytes, bytes]) -> None:
    with pytest.raises(PermanentError, match=r"github_app\.app_id"):
        _app(app_id="", private_key=keypair[0].decode()).check_key()


def test_garbage_key_is_refused_without_echoing_it(tmp_path) -> None:
    secret = (
        "-----BEGIN RSA PRIVATE KEY-----\nTOPSECRETBYTES0123456789\n-----END RSA PRIVATE KEY-----\n"
    )
    path = tmp_path / "app.pem"
    path.write_text(secret)
    for app in (_app(private_key_path=str(path)), _app(private_key=secret)):
        with pytest.raises(PermanentError, match="not a PEM private key") as err:
            app.check_key()
        assert "TOPSECRETBYTES" not in str(err.value)
        assert "TOPSECRETBYTES" not in repr(err.value)
        assert "TOPSECRETBYTES" not in repr(app)


def test_non_rsa_key_is_refused(tmp_path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(PermanentError, match="not an RSA key"):
        _app(private_key_path=str(path)).check_key()


def test_encrypted_key_is_refused(tmp_path, keypair: tuple[bytes, bytes]) -> None:
    key = serialization.load_pem_private_key(keypair[0], password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path = tmp_path / "enc.pem"
    path.write_bytes(pem)
    with pytest.raises(PermanentError, match="encrypted"):
        _app(private_key_path=str(path)).check_key()


def test_a_valid_key_passes(tmp_path, keypair: tuple[bytes, bytes]) -> None:
    path = tmp_path / "app.pem"
    path.write_bytes(keypair[0])
    _app(private_key_path=str(path)).check_key()
    _app(private_key=keypair[0].decode()).check_key()


def test_cache_cipher_is_the_same_for_pkcs1_and_pkcs8_files(keypair: tuple[bytes, bytes]) -> None:
    pkcs1 = load_app_key(GithubAppSettings(private_key=keypair[0].decode()))
    pkcs8_pem = pkcs1.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pkcs8 = load_app_key(GithubAppSettings(private_key=pkcs8_pem.decode()))
    blob = token_cipher(pkcs1).encrypt(b"ghs_secret")
    assert b"ghs_secret" not in blob
    assert token_cipher(pkcs8).decrypt(blob) == b"ghs_secret"


def test_other_key_cannot_read_the_cache(keypair: tuple[bytes, bytes]) -> None:
    from cryptography.fernet import InvalidToken

    mine = load_app_key(GithubAppSettings(private_key=keypair[0].decode()))
    other = load_app_key(GithubAppSettings(private_key=generate_app_key()[0].decode()))
    with pytest.raises(InvalidToken):
        token_cipher(other).decrypt(token_cipher(mine).encrypt(b"ghs_secret"))


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2026-01-01T00:00:00Z", 1_767_225_600.0),
        ("2026-01-01T01:00:00+01:00", 1_767_225_600.0),
        ("2025-12-31T16:00:00.000-08:00", 1_767_225_600.0),
    ],
)
def test_parse_time(text: str, epoch: float) -> None:
    assert parse_time(text) == epoch
