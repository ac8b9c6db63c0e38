"""Magic links (behaviour.md 5): signed, short-lived, single-use tokens in emailed URLs.

A link token is a compact JWS, HS256 with the ``link`` sub-key of the master
key whose version is the header's ``kid``. Its header ``typ`` and its audience
differ from access tokens', and its key is symmetric where theirs is not, so
neither can pass as the other.

Single use has two layers. A ``link:used:{jti}`` mark in the ephemeral store,
set with NX when the redeeming operation commits, answers LINK_USED quickly on
every replica. The truth is the state each purpose checks in SQL or in the
challenge record (``credential_version`` bumped, address changed, challenge
done): a lost mark never lets a link work twice.

URLs are built from ``links.base_url`` and the purpose's path only, never from
request data.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

import jwt

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.errors import BackendUnavailable, ChallengeExpired, InvalidArgument, LinkUsed
from iam_grpc.storage.ports import Ephemeral

__all__ = ["IssuedLink", "LinkClaims", "LinkPurpose", "Links"]

LinkPurpose = Literal["mfa", "step_up", "password_reset", "email_change", "verify_email"]
MAX_LINK_BYTES = 2048
_TYP = "iam-link+jwt"
_AUDIENCE = "iam-link"
_CLAIMS_OF: dict[str, tuple[str, ...]] = {
    "mfa": ("cid",),
    "step_up": ("cid",),
    "password_reset": ("cv",),
    "email_change": ("cv", "sid", "nem", "oeh"),
    "verify_email": ("oeh",),  # the keyed hash of the address it verifies
}
_USED_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class IssuedLink:
    token: str
    url: str
    jti: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LinkClaims:
    purpose: str
    subject: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    extra: Mapping[str, Any]


def _field() -> InvalidArgument:
    return InvalidArgument.one("link_token", "is not a valid link")


class Links:
    def __init__(
        self,
        material: SecretMaterial,
        ephemeral: Ephemeral,
        clock: Clock,
        *,
        issuer: str,
        base_url: str,
        paths: Mapping[str, str],
    ) -> None:
        self._material = material
        self._ephemeral = ephemeral
        self._clock = clock
        self._issuer = issuer
        self._base = base_url.rstrip("/")
        self._paths = dict(paths)

    def issue(self, purpose: LinkPurpose, subject: str, ttl: timedelta, **claims: Any) -> IssuedLink:
        missing = [name for name in _CLAIMS_OF[purpose] if name not in claims]
        if missing:
            raise ValueError(f"a {purpose} link needs {', '.join(missing)}")
        now = self._clock.now()
        expires = now + ttl
        jti = secrets.token_urlsafe(16)
        payload = {
            "iss": self._issuer,
            "aud": _AUDIENCE,
            "jti": jti,
            "pur": purpose,
            "sub": subject,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            **claims,
        }
        version = self._material.version
        token = jwt.encode(
            payload,
            self._material.subkey("link", version),
            algorithm="HS256",
            headers={"typ": _TYP, "kid": str(version)},
        )
        url = f"{self._base}{self._paths[purpose]}?{urlencode({'token': token})}"
        return IssuedLink(token, url, jti, datetime.fromtimestamp(payload["exp"], UTC))

    def read(self, token: str) -> LinkClaims:
        """Shape, signature, header and claims (not expiry, not use). Raises INVALID_ARGUMENT."""
        if not token or len(token.encode()) > MAX_LINK_BYTES or token.count(".") != 2:
            raise _field()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _field() from None
        kid = header.get("kid")
        if header.get("alg") != "HS256" or header.get("typ") != _TYP or not isinstance(kid, str):
            raise _field()
        try:
            key = self._material.subkey("link", int(kid))
        except (KeyError, ValueError):
            raise _field() from None
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                audience=_AUDIENCE,
                issuer=self._issuer,
                options={
                    "require": ["iss", "aud", "jti", "pur", "sub", "iat", "exp"],
                    "verify_exp": False,  # expiry is its own answer (CHALLENGE_EXPIRED), checked next
                    # Times are the injected clock's, never PyJWT's own: a link minted by a replica
                    # whose clock runs a second ahead must not be refused as "not yet valid".
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            raise _field() from None
        purpose = payload.get("pur")
        if purpose not in _CLAIMS_OF or any(name not in payload for name in _CLAIMS_OF[purpose]):
            raise _field()
        if not isinstance(payload["exp"], int) or not isinstance(payload["iat"], int):
            raise _field()
        extra = {name: payload[name] for name in _CLAIMS_OF[purpose]}
        return LinkClaims(
            purpose=str(purpose),
            subject=str(payload["sub"]),
            jti=str(payload["jti"]),
            issued_at=datetime.fromtimestamp(payload["iat"], UTC),
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
            extra=extra,
        )

    async def verify(self, token: str, purpose: LinkPurpose) -> LinkClaims:
        """behaviour.md 5.3 up to the used mark; the caller checks the linked state.

        A link of another purpose is INVALID_ARGUMENT and is not consumed.
        """
        claims = self.read(token)
        if claims.purpose != purpose:
            raise InvalidArgument.one("link_token", "is not a link for this operation")
        if claims.expires_at <= self._clock.now():
            raise ChallengeExpired()
        if await self.is_used(claims.jti):
            raise LinkUsed()
        return claims

    async def is_used(self, jti: str) -> bool:
        try:
            return await self._ephemeral.get(_used_key(jti)) is not None
        except BackendUnavailable:
            return False  # the SQL or challenge state check decides (5.3)

    async def mark_used(self, claims: LinkClaims) -> bool:
        """Set the used mark after the redeeming operation committed; False when it was set already."""
        ttl = max(claims.expires_at - self._clock.now(), timedelta(0)) + _USED_MARGIN
        try:
            return await self._ephemeral.set_if_absent(_used_key(claims.jti), b"1", ttl)
        except BackendUnavailable:
            return True  # the state check in SQL keeps the link single-use without the mark


def _used_key(jti: str) -> str:
    return f"link:used:{{{jti}}}"
