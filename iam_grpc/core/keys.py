"""Signing keys (behaviour.md 1.3): creation, encryption at rest, loading.

Private keys are stored as PKCS#8 DER sealed with AES-256-GCM under the
``kek`` sub-key, with the kid as associated data. The kid is the RFC 7638
thumbprint of the public key. Every transition (publish, activate,
deactivate, unpublish) is a timestamp, so replicas agree without talking.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SealError, SecretMaterial
from iam_grpc.ids import b64url
from iam_grpc.storage.ports import Database
from iam_grpc.storage.records import SigningKey

__all__ = ["KeyRing", "KeysUnreadable", "LoadedKey", "generate_key", "thumbprint"]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
LOCK = "keys:rotate"


class KeysUnreadable(Exception):
    """A stored key cannot be used: no configured master key opens it, or its row is corrupt."""

    def __init__(self, kid: str, why: str = "no configured master key can decrypt it") -> None:
        super().__init__(f"signing key {kid}: {why}")
        self.kid = kid
        self.why = why


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def _public_jwk(public: PublicKey, alg: str) -> dict[str, Any]:
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y")}


def generate_key(
    alg: str, material: SecretMaterial, *, now: datetime, publish_at: datetime, activate_at: datetime
) -> SigningKey:
    private: PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else ed25519.Ed25519PrivateKey.generate()
    )
    jwk = _public_jwk(private.public_key(), alg)
    kid = thumbprint(jwk)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SigningKey(
        kid=kid,
        alg=alg,
        public_jwk={**jwk, "kid": kid, "alg": alg, "use": "sig"},
        private_key_enc=material.seal("kek", der, kid.encode()),
        created_at=now,
        publish_at=publish_at,
        activate_at=activate_at,
    )


@dataclass(frozen=True, slots=True)
class LoadedKey:
    row: SigningKey
    public: PublicKey
    private: PrivateKey | None  # None once destroyed, or when not needed


class KeyRing:
    """The key table as this replica last read it."""

    def __init__(
        self,
        db: Database,
        material: SecretMaterial,
        clock: Clock,
        *,
        algorithm: str,
        publish_ahead: timedelta = timedelta(hours=1),
        retire_after: timedelta = timedelta(minutes=20, seconds=30),
        rotation_interval: timedelta = timedelta(days=30),
    ) -> None:
        self._db = db
        self._material = material
        self._clock = clock
        self._algorithm = algorithm
        self._publish_ahead = publish_ahead
        # A retired key stays published until its last token has expired and every JWKS cache has seen
        # the change: access TTL + leeway + JWKS max-age.
        self._retire_after = retire_after
        self._rotation_interval = rotation_interval
        self._keys: dict[str, LoadedKey] = {}
        self.reloads = 0

    async def rotate(self, *, immediate: bool = False, revoke: str | None = None) -> SigningKey:
        """Create the next key (behaviour.md 1.3).

        Planned: published now, signing after ``keys.publish_ahead`` so caches know it first; the
        current key stops signing then and stays published until its tokens have expired.
        Immediate: signing now; ``revoke`` names a key to withdraw at once (its tokens fail).
        """
        async with self._db.named_lock(LOCK, timedelta(seconds=30)) as held:
            if not held:
                raise RuntimeError("another process is rotating keys")
            async with self._db.transaction() as tx:
                now = self._clock.now()
                activate = now if immediate else now + self._publish_ahead
                new = generate_key(
                    self._algorithm, self._material, now=now, publish_at=now, activate_at=activate
                )
                for row in await tx.keys.all():
                    if row.kid == revoke:
                        await tx.keys.retire(row.kid, deactivate_at=now, unpublish_at=now, destroy_at=now)
                        # the deny-list's authority, in the same transaction (its tokens die with it)
                        await tx.revocations.add("kid", [row.kid], now, now + self._retire_after)
                    elif row.deactivate_at is None or row.deactivate_at > activate:
                        await tx.keys.retire(
                            row.kid, deactivate_at=activate, unpublish_at=activate + self._retire_after
                        )
                await tx.keys.insert(new)
                await tx.events.append(
                    "keys.rotated",
                    now,
                    data={
                        "kid": new.kid,
                        "activate_at": activate.isoformat(),
                        "revoked_kid": revoke or "",
                    },
                )
        await self.reload()
        return new

    async def maintain(self) -> None:
        """Periodic: reload, destroy private parts of retired keys, rotate when the active key is old."""
        now = self._clock.now()
        async with self._db.transaction() as tx:
            for row in await tx.keys.all():
                if (
                    row.private_key_enc is not None
                    and row.deactivate_at is not None
                    and row.deactivate_at <= now
                ):
                    await tx.keys.retire(row.kid, destroy_at=now)
        await self.reload()
        if self._rotation_interval.total_seconds() <= 0:
            return
        newest = max((k.row.activate_at for k in self._keys.values()), default=None)
        if newest is not None and newest <= now - self._rotation_interval:
            with contextlib.suppress(RuntimeError):  # another replica is rotating
                await self.rotate()

    def rows(self) -> list[SigningKey]:
        return sorted((k.row for k in self._keys.values()), key=lambda r: r.activate_at)

    async def ensure_initial_key(self) -> None:
        """Create the first key (publish and activate now) when the table has none usable."""
        async with self._db.named_lock(LOCK, timedelta(seconds=30)) as held:
            if not held:
                return  # another replica is creating it; the caller reloads and checks
            await self._create_if_none()

    async def _create_if_none(self) -> None:
        async with self._db.transaction() as tx:
            rows = await tx.keys.all()
            now = self._clock.now()
            if any(self._signs_at(row, now) and row.alg == self._algorithm for row in rows):
                return
            await tx.keys.insert(
                generate_key(self._algorithm, self._material, now=now, publish_at=now, activate_at=now)
            )

    @staticmethod
    def _signs_at(row: SigningKey, now: datetime) -> bool:
        return (
            row.private_key_enc is not None
            and row.activate_at <= now
            and (row.deactivate_at is None or row.deactivate_at > now)
        )

    async def reload(self) -> None:
        """Read the key table; decrypt what may sign. Raises :class:`KeysUnreadable`."""
        async with self._db.transaction() as tx:
            rows = await tx.keys.all()
        loaded: dict[str, LoadedKey] = {}
        now = self._clock.now()
        for row in rows:
            retired = row.unpublish_at is not None and row.unpublish_at <= now
            if retired and row.private_key_enc is None:
                continue  # kept for the record only: it neither signs nor verifies
            public = _load_public(row)
            private: PrivateKey | None = None
            if row.private_key_enc is not None and (row.deactivate_at is None or row.deactivate_at > now):
                try:
                    der = self._material.open("kek", row.private_key_enc, row.kid.encode())
                except SealError:
                    raise KeysUnreadable(row.kid) from None
                key = serialization.load_der_private_key(der, password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
                    raise KeysUnreadable(row.kid, "the stored private key is not an EC or Ed25519 key")
                private = key
            loaded[row.kid] = LoadedKey(row, public, private)
        self._keys = loaded
        self.reloads += 1

    def signing_key(self) -> LoadedKey | None:
        """The key with the latest ``activate_at <= now`` that is not deactivated."""
        now = self._clock.now()
        usable = [
            k
            for k in self._keys.values()
            if k.private is not None and k.row.alg == self._algorithm and self._signs_at(k.row, now)
        ]
        return max(usable, key=lambda k: k.row.activate_at) if usable else None

    def verification_key(self, kid: str) -> LoadedKey | None:
        """A key that is published and activated now (never one that is not yet active)."""
        key = self._keys.get(kid)
        if key is None or key.row.alg != self._algorithm:
            return None  # the algorithm is pinned by configuration, never chosen by a key or a header
        now = self._clock.now()
        row = key.row
        published = row.publish_at <= now and (row.unpublish_at is None or row.unpublish_at > now)
        return key if published and row.activate_at <= now else None

    def jwks(self) -> dict[str, Any]:
        """Public parts of every key with ``publish_at <= now < unpublish_at``."""
        now = self._clock.now()
        keys = [
            k.row.public_jwk
            for k in sorted(self._keys.values(), key=lambda k: k.row.activate_at)
            if k.row.publish_at <= now and (k.row.unpublish_at is None or k.row.unpublish_at > now)
        ]
        return {"keys": keys}

    def __len__(self) -> int:
        return len(self._keys)


def _load_public(row: SigningKey) -> PublicKey:
    jwk = json.dumps(row.public_jwk)
    try:
        key = ECAlgorithm.from_jwk(jwk) if row.public_jwk.get("kty") == "EC" else OKPAlgorithm.from_jwk(jwk)
    except (ValueError, TypeError, jwt.PyJWTError):  # binascii.Error is a ValueError
        raise KeysUnreadable(row.kid, "its public key (public_jwk) is corrupt") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise KeysUnreadable(row.kid, "its public key is not an EC or Ed25519 key")
    return key
