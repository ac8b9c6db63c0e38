"""Keyed hashes, sub-keys and sealing (behaviour.md section 0).

One master secret; one HKDF-SHA256 sub-key per use. A value hashed for one use
never matches another use. Older master keys are tried after the current one
when reading something written with them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iam_grpc.ids import b64url

__all__ = [
    "Purpose",
    "SealError",
    "SecretMaterial",
    "constant_time_equal",
    "decode_key",
    "generate_key_text",
    "open_with_secret",
    "seal_with_secret",
]

Purpose = Literal[
    "refresh", "otp", "grant", "link", "ratelimit", "email", "log", "outbox", "kek", "totp", "api_token"
]
_PURPOSES: tuple[Purpose, ...] = (
    "refresh",
    "otp",
    "grant",
    "link",
    "ratelimit",
    "email",
    "log",
    "outbox",
    "kek",
    "totp",
    "api_token",
)
_NONCE = 12


def seal_with_secret(secret: bytes, purpose: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM under a key derived from ``secret`` itself: only a holder of the secret can open it.

    Used for the refresh grace cache, sealed under the presented refresh token (behaviour.md 1.5).
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iam-grpc/" + purpose).derive(secret)
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, purpose)


def open_with_secret(secret: bytes, purpose: bytes, sealed: bytes) -> bytes:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iam-grpc/" + purpose).derive(secret)
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], purpose)
    except (InvalidTag, ValueError):
        raise SealError("sealed value does not open") from None


class SealError(Exception):
    """A sealed value did not open under any known key (tampered, or a lost master key)."""


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare secrets or their hashes without leaking where they differ."""
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


def decode_key(text: str) -> bytes:
    """Decode base64 (standard or url-safe, padding optional) master-key text."""
    cleaned = text.strip()
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_")


def generate_key_text(size: int = 32) -> str:
    """A new random key as url-safe base64 text (for master keys and peppers)."""
    return b64url(secrets.token_bytes(size))


def _derive(master: bytes, purpose: Purpose) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iam-grpc/" + purpose.encode()).derive(
        master
    )


def _key_version(master: bytes) -> int:
    digest = HKDF(algorithm=hashes.SHA256(), length=2, salt=None, info=b"iam-grpc/version").derive(master)
    return 1 + int.from_bytes(digest, "big") % 32767


@dataclass(frozen=True, slots=True)
class _KeySet:
    version: int
    subkeys: dict[str, bytes]


class SecretMaterial:
    """The master keys (current first) and everything derived from them.

    Each master key has a ``version``: a 15-bit number derived from the key
    itself, so it stays the same whatever other keys are configured. Stored
    rows record it to say which key made them.
    """

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        if len(current) < 32 or any(len(key) < 32 for key in previous):
            raise ValueError("master keys must be at least 32 bytes")
        self._sets: list[_KeySet] = []
        for key in [current, *previous]:
            version = _key_version(key)
            if any(existing.version == version for existing in self._sets):
                continue  # the same key listed twice
            self._sets.append(_KeySet(version, {purpose: _derive(key, purpose) for purpose in _PURPOSES}))

    @property
    def version(self) -> int:
        return self._sets[0].version

    def subkey(self, purpose: Purpose, version: int | None = None) -> bytes:
        for key_set in self._sets:
            if version is None or key_set.version == version:
                return key_set.subkeys[purpose]
        raise KeyError(f"no master key of version {version}")

    def versions(self) -> list[int]:
        return [key_set.version for key_set in self._sets]

    # keyed hashes -----------------------------------------------------------

    def keyed_hash(self, purpose: Purpose, value: str | bytes, version: int | None = None) -> str:
        """HMAC-SHA256 under the purpose's sub-key, as 43 unpadded base64url chars."""
        data = value.encode() if isinstance(value, str) else value
        return b64url(hmac.new(self.subkey(purpose, version), data, hashlib.sha256).digest())

    def log_hash(self, value: str) -> str:
        """A 12-character keyed hash for logs (device ids, tokens): correlatable, not reversible."""
        return self.keyed_hash("log", value)[:12]

    def keyed_hashes(self, purpose: Purpose, value: str | bytes) -> list[tuple[int, str]]:
        """The value's hash under every known master key, current first (for lookups)."""
        return [(version, self.keyed_hash(purpose, value, version)) for version in self.versions()]

    # sealing ----------------------------------------------------------------

    def seal(self, purpose: Purpose, plaintext: bytes, associated: bytes) -> bytes:
        """AES-256-GCM under the purpose's current sub-key: 2-byte key version, nonce, ciphertext."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = AESGCM(self.subkey(purpose)).encrypt(nonce, plaintext, associated)
        return self.version.to_bytes(2, "big") + nonce + sealed

    def open(self, purpose: Purpose, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < 2 + _NONCE + 16:
            raise SealError("sealed value too short")
        version = int.from_bytes(sealed[:2], "big")
        nonce, body = sealed[2 : 2 + _NONCE], sealed[2 + _NONCE :]
        try:
            key = self.subkey(purpose, version)
        except KeyError:
            raise SealError("sealed with an unknown master key") from None
        try:
            return AESGCM(key).decrypt(nonce, body, associated)
        except InvalidTag:
            raise SealError("sealed value does not open") from None
