"""Throwaway GitHub App key pairs for the local world and tests (no PEM file is committed)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def generate_app_key() -> tuple[bytes, bytes]:
    """A fresh RSA 2048 key pair as (private PEM, public PEM), the kind GitHub issues to Apps."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        # GitHub hands out PKCS#1 ("BEGIN RSA PRIVATE KEY") files; mimic them.
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem
