"""Access tokens (behaviour.md 1.2): stateless JWTs signed with the active key,
verified in a fixed order where the first failure answers, so a forged token
never learns anything (expiry is reported only after the signature passed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import constant_time_equal
from iam_grpc.core.keys import KeyRing
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.errors import RoleRequired, SessionRevoked, TokenExpired, TokenInvalid
from iam_grpc.ids import JTI, new_jti

__all__ = ["AccessClaims", "AccessTokens", "MintedToken"]

MAX_TOKEN_BYTES = 4096
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
_REQUIRED = ["iss", "aud", "sub", "sid", "did", "roles", "jti", "iat", "exp", "auth_time"]
_RELOAD_EVERY = 10.0  # seconds: unknown kids reload the key table at most this often
_CACHE_SIZE = 8192  # verified tokens remembered per worker, least recently used first out (~0.5 KB each)
_B64URL = re.compile(r"^[A-Za-z0-9_-]+\Z")


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str
    device_id: str
    roles: tuple[str, ...]
    jti: str
    issued_at: datetime
    expires_at: datetime
    auth_time: datetime
    kid: str = ""


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str
    claims: AccessClaims


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, strictly: base64url without padding, a JSON object."""
    segment = token.split(".", 1)[0]
    if not segment or len(segment) > 1024 or not _B64URL.match(segment):
        raise TokenInvalid()
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise TokenInvalid() from None
    if not isinstance(header, dict):
        raise TokenInvalid()
    return header


def _when(value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid()
    return datetime.fromtimestamp(value, UTC)


class AccessTokens:
    def __init__(
        self,
        keys: KeyRing,
        denylist: DenyList,
        clock: Clock,
        metrics: CoreMetrics,
        *,
        algorithm: str,
        issuer: str,
        audience: str,
        ttl: timedelta,
        leeway: timedelta,
    ) -> None:
        self._keys = keys
        self._denylist = denylist
        self._clock = clock
        self._metrics = metrics
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._leeway = leeway
        self._last_reload = 0.0
        # A signature is checked once per token per worker: the claims of verified tokens, keyed by
        # the token's SHA-256 (the token itself is not kept), dropped once the token has expired.
        self._verified: OrderedDict[bytes, AccessClaims] = OrderedDict()

    @property
    def ttl(self) -> timedelta:
        return self._ttl

    def mint(
        self,
        *,
        user_id: str,
        session_id: str,
        device_id: str,
        roles: Sequence[str],
        auth_time: datetime,
        jti: str | None = None,
    ) -> MintedToken:
        key = self._keys.signing_key()
        if key is None or key.private is None:
            raise RuntimeError("no signing key is active")
        now = self._clock.now().replace(microsecond=0)
        claims = AccessClaims(
            user_id=user_id,
            session_id=session_id,
            device_id=device_id,
            roles=tuple(sorted(set(roles))),
            jti=jti or new_jti(),
            issued_at=now,
            expires_at=now + self._ttl,
            auth_time=auth_time.replace(microsecond=0),
        )
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": claims.user_id,
            "sid": claims.session_id,
            "did": claims.device_id,
            "roles": list(claims.roles),
            "jti": claims.jti,
            "iat": int(now.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
            "auth_time": int(claims.auth_time.timestamp()),
        }
        token = jwt.encode(
            payload, key.private, algorithm=self._algorithm, headers={"kid": key.row.kid, "typ": "at+jwt"}
        )
        return MintedToken(token, claims)

    async def _key_for(self, kid: str) -> Any:
        key = self._keys.verification_key(kid)
        if key is None and time.monotonic() - self._last_reload >= _RELOAD_EVERY:
            # An unknown kid may be a key another replica just created: look once, not per token.
            self._last_reload = time.monotonic()
            self._metrics.key_reloads.inc()
            await self._keys.reload()
            key = self._keys.verification_key(kid)
        if key is None:
            raise TokenInvalid()
        return key.public

    async def decode(self, token: str) -> AccessClaims:
        """Steps 1-6: shape, header, key, signature, claims, time. No deny-lists.

        A token whose signature and claims were verified before is answered from a small cache
        (the same bytes always verify the same way), after checking that its key is still
        published and its times still hold; a token is typically presented many times.
        """
        if not token or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise TokenInvalid()
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if self._keys.verification_key(cached.kid) is None:
                self._verified.pop(digest, None)
                raise TokenInvalid()
            try:
                claims = self._check_times(cached)
            except TokenExpired:
                self._verified.pop(digest, None)  # entries expire with their token
                raise
            self._verified.move_to_end(digest)
            return claims
        claims = await self._decode_uncached(token)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.popitem(last=False)
        self._verified[digest] = claims
        return claims

    def _check_times(self, claims: AccessClaims) -> AccessClaims:
        now = self._clock.now()
        if claims.issued_at > now + self._leeway:
            raise TokenInvalid()
        if claims.expires_at + self._leeway < now:
            raise TokenExpired()
        return claims

    async def _decode_uncached(self, token: str) -> AccessClaims:
        header = _header(token)
        if (
            header.get("alg") != self._algorithm
            or header.get("typ") != "at+jwt"
            or not isinstance(header.get("kid"), str)
            or _FORBIDDEN_HEADERS & set(header)
        ):
            raise TokenInvalid()
        public = await self._key_for(header["kid"])
        try:
            payload = jwt.decode(
                token,
                public,
                algorithms=[self._algorithm],  # pinned from configuration, never from the header
                audience=self._audience,
                issuer=self._issuer,
                options={"require": _REQUIRED, "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        subject, session, device, jti, roles = (payload.get(k) for k in ("sub", "sid", "did", "jti", "roles"))
        if (
            not all(isinstance(v, str) and v for v in (subject, session, device, jti))
            or not isinstance(roles, list)
            or not all(isinstance(r, str) for r in roles)
            or not JTI.match(str(jti))
        ):
            raise TokenInvalid()
        issued, expires, auth_time = _when(payload["iat"]), _when(payload["exp"]), _when(payload["auth_time"])
        claims = AccessClaims(
            str(subject),
            str(session),
            str(device),
            tuple(roles),
            str(jti),
            issued,
            expires,
            auth_time,
            str(header["kid"]),
        )
        return self._check_times(claims)

    async def verify(self, token: str, required_roles: Sequence[str] = ()) -> AccessClaims:
        """Steps 1-8 of VerifyAccessToken."""
        claims = await self.decode(token)
        denied = await self._denylist.check(claims.session_id, claims.jti, claims.kid)
        if denied == "key":
            raise TokenInvalid()  # withdrawn in an emergency; the key table reload will follow
        if denied == "session":
            raise SessionRevoked()
        if denied == "token":
            raise TokenInvalid()
        missing = [role for role in required_roles if role not in claims.roles]
        if missing:
            raise RoleRequired(missing)
        return claims

    async def verify_from_device(self, token: str, device_id: str) -> AccessClaims:
        """Steps 1-7, and the token must belong to the device that presents it (RPCs that carry
        ``client``): a non-empty ``client.device_id`` equal to ``did``, else TOKEN_INVALID."""
        claims = await self.verify(token)
        if not device_id or not constant_time_equal(device_id, claims.device_id):
            raise TokenInvalid()
        return claims
