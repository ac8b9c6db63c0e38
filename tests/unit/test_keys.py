"""Signing-key helpers: thumbprints and encrypted private keys."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization

from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.keys import generate_key, thumbprint

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_okp_thumbprint_matches_rfc_8037() -> None:
    """The RFC 8037 appendix A.3 example thumbprint."""
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_generated_keys_publish_only_public_parts_under_their_thumbprint() -> None:
    """The JWK carries kid, alg and use and no private member; the kid is its thumbprint."""
    material = SecretMaterial(bytes(32))
    for alg, kty in (("ES256", "EC"), ("EdDSA", "OKP")):
        key = generate_key(alg, material, now=NOW, publish_at=NOW, activate_at=NOW)
        assert key.public_jwk["kty"] == kty
        assert (key.public_jwk["alg"], key.public_jwk["use"], key.public_jwk["kid"]) == (alg, "sig", key.kid)
        assert "d" not in key.public_jwk
        assert thumbprint(key.public_jwk) == key.kid


def test_stored_private_keys_do_not_parse_without_the_master_key() -> None:
    """The stored bytes are sealed: not a DER or PEM key (S27)."""
    key = generate_key("ES256", SecretMaterial(bytes(32)), now=NOW, publish_at=NOW, activate_at=NOW)
    assert key.private_key_enc is not None
    for loader in (serialization.load_der_private_key, serialization.load_pem_private_key):
        try:
            loader(key.private_key_enc, password=None)
        except ValueError:
            continue
        raise AssertionError("a stored private key parsed without the master key")
