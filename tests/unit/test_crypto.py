"""Keyed hashes, sub-keys and sealing."""

from __future__ import annotations

import base64
import hashlib

import pytest

from iam_grpc.core.crypto import SealError, SecretMaterial, constant_time_equal, decode_key, generate_key_text

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_one_value_hashed_for_each_purpose_gives_distinct_values() -> None:
    """refresh, otp, grant, ratelimit and log hashes of one input differ, and none is a plain SHA-256 (S48)."""
    material = SecretMaterial(KEY_A)
    value = "iamr_" + "x" * 43
    hashes = {
        purpose: material.keyed_hash(purpose, value)
        for purpose in ("refresh", "otp", "grant", "ratelimit", "log")
    }
    assert len(set(hashes.values())) == 5
    plain = base64.urlsafe_b64encode(hashlib.sha256(value.encode()).digest()).rstrip(b"=").decode()
    assert plain not in hashes.values()
    assert all(len(h) == 43 for h in hashes.values())


def test_keyed_hashes_depend_on_the_master_key() -> None:
    """Another master key gives other hashes."""
    assert SecretMaterial(KEY_A).keyed_hash("refresh", "v") != SecretMaterial(KEY_B).keyed_hash(
        "refresh", "v"
    )


def test_previous_master_keys_are_tried_after_the_current_one() -> None:
    """keyed_hashes lists the current key's hash first, then each older key's."""
    rotated = SecretMaterial(KEY_B, [KEY_A])
    hashes = rotated.keyed_hashes("refresh", "v")
    assert [h for _, h in hashes] == [
        SecretMaterial(KEY_B).keyed_hash("refresh", "v"),
        SecretMaterial(KEY_A).keyed_hash("refresh", "v"),
    ]


def test_key_versions_do_not_depend_on_the_other_keys() -> None:
    """A key keeps its version whatever keys are configured next to it."""
    alone = SecretMaterial(KEY_A).version
    assert SecretMaterial(KEY_B, [KEY_A]).versions()[1] == alone
    assert 1 <= alone <= 32767


def test_sealed_values_open_only_with_the_same_purpose_and_associated_data() -> None:
    """AES-GCM: wrong associated data, another purpose or a flipped byte fail."""
    material = SecretMaterial(KEY_A)
    sealed = material.seal("outbox", b"code 123456", b"row-1")
    assert material.open("outbox", sealed, b"row-1") == b"code 123456"
    assert b"123456" not in sealed
    with pytest.raises(SealError):
        material.open("outbox", sealed, b"row-2")
    with pytest.raises(SealError):
        material.open("kek", sealed, b"row-1")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        material.open("outbox", tampered, b"row-1")
    with pytest.raises(SealError):
        material.open("outbox", b"short", b"row-1")


def test_values_sealed_under_an_old_key_still_open_after_rotation() -> None:
    """Rotating the master key keeps old sealed values readable; a dropped key makes them unreadable."""
    old = SecretMaterial(KEY_A).seal("kek", b"private", b"kid")
    assert SecretMaterial(KEY_B, [KEY_A]).open("kek", old, b"kid") == b"private"
    with pytest.raises(SealError):
        SecretMaterial(KEY_B).open("kek", old, b"kid")


def test_short_master_keys_are_refused() -> None:
    """A master key has at least 32 bytes."""
    with pytest.raises(ValueError, match="32 bytes"):
        SecretMaterial(b"short")


def test_generated_keys_decode_to_the_requested_size() -> None:
    """secrets generate prints url-safe base64 of fresh random bytes."""
    text = generate_key_text(48)
    assert len(decode_key(text)) == 48
    assert generate_key_text() != generate_key_text()


def test_constant_time_equal_compares_text_and_bytes() -> None:
    """The comparison helper answers like == for str and bytes."""
    assert constant_time_equal("abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert constant_time_equal(b"\x00\x01", b"\x00\x01")
    assert not constant_time_equal("abc", "abcd")
