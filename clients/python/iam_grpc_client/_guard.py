"""Local access-token verification for services that call iam-grpc.

A :class:`TokenGuard` checks signature and claims against the service's JWKS
(fetched through GetJwks or any async source, cached, refetched when an
unknown ``kid`` shows up but at most once per ``refetch_interval``). Locally
verified tokens may have been revoked up to ``access_ttl`` ago; pass
``revocation=client`` to also ask VerifyAccessToken (one RPC per check).

PyJWT (with cryptography, urllib and ssl behind it) costs about as much to import
as grpc itself, and a service that only calls the API never needs it: it is
imported when the first guard is built, not with the package.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from iam_grpc_client._client import IamClient
from iam_grpc_client._errors import IamCallError

__all__ = ["Principal", "TokenGuard"]

_REQUIRED = ["iss", "aud", "sub", "sid", "did", "roles", "jti", "iat", "exp"]
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified access token speaks for."""

    user_id: str
    session_id: str
    device_id: str
    roles: tuple[str, ...]
    jti: str
    expires_at: datetime

    def has(self, *roles: str) -> bool:
        return all(role in self.roles for role in roles)


def _invalid() -> IamCallError:
    return IamCallError(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID", "The token is invalid.")


def _parse_jwks(text: str) -> dict[str, Any]:
    """kid -> key; an empty set is valid (every key withdrawn), a malformed one is an outage."""
    import jwt

    try:
        document = json.loads(text)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK set")
        if not document["keys"]:
            return {}
        return {key.key_id: key for key in jwt.PyJWKSet.from_dict(document).keys if key.key_id}
    except (ValueError, jwt.PyJWTError) as error:
        raise IamCallError(
            grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "The key set could not be read."
        ) from error


def _expired() -> IamCallError:
    return IamCallError(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED", "The token has expired.")


class TokenGuard:
    def __init__(
        self,
        jwks: Callable[[], Awaitable[str]] | IamClient,
        *,
        issuer: str = "iam-grpc",
        audience: str = "iam-grpc",
        algorithms: Sequence[str] = ("ES256",),
        leeway: timedelta = timedelta(seconds=30),
        max_age: timedelta = timedelta(minutes=5),
        refetch_interval: timedelta = timedelta(seconds=10),
        revocation: IamClient | None = None,
    ) -> None:
        import jwt  # noqa: F401  (loaded here, at startup, rather than on the first request)

        self._source = jwks.get_jwks if isinstance(jwks, IamClient) else jwks
        self._issuer = issuer
        self._audience = audience
        self._algorithms = tuple(algorithms)
        self._leeway = leeway.total_seconds()
        self._max_age = max_age.total_seconds()
        self._refetch = refetch_interval.total_seconds()
        self._revocation = revocation
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        # token -> (kid, iat, principal): the same bytes always verify the same way, so a token
        # seen before skips the signature check; its key and times are checked on every call.
        self._verified: dict[str, tuple[str, float, Principal]] = {}
        self.fetches = 0

    async def _load(self, *, force: bool) -> None:
        if not force and time.monotonic() - self._fetched < self._max_age:
            return
        async with self._lock:
            age = time.monotonic() - self._fetched
            if (not force and age < self._max_age) or (force and age < self._refetch):
                return
            self._keys = _parse_jwks(await self._source())
            self._fetched = time.monotonic()
            self.fetches += 1

    async def _key(self, kid: str) -> Any:
        await self._load(force=False)
        if kid not in self._keys:
            await self._load(force=True)  # a key published after our last fetch
        key = self._keys.get(kid)
        if key is None:
            raise _invalid()
        return key

    async def verify(self, token: str, required_roles: Sequence[str] = ()) -> Principal:
        """Signature, header and claims (and revocation, when configured); raise IamCallError."""
        if not token or len(token) > 4096 or token.count(".") != 2:
            raise _invalid()
        principal = await self._cached(token)
        if principal is None:
            principal = await self._verify_signed(token)
        missing = [role for role in required_roles if role not in principal.roles]
        if missing:
            raise IamCallError(
                grpc.StatusCode.PERMISSION_DENIED,
                "ROLE_REQUIRED",
                "A required role is missing.",
                metadata={"missing": ",".join(sorted(missing))},
            )
        if self._revocation is not None:
            await self._revocation.verify_access_token(token)
        return principal

    async def _cached(self, token: str) -> Principal | None:
        hit = self._verified.get(token)
        if hit is None:
            return None
        kid, issued_at, principal = hit
        await self._load(force=False)
        if kid not in self._keys:
            self._verified.pop(token, None)  # the key was withdrawn: verify from scratch
            return None
        now = time.time()
        if issued_at > now + self._leeway:
            raise _invalid()
        if principal.expires_at.timestamp() + self._leeway < now:
            self._verified.pop(token, None)
            raise _expired()
        return principal

    async def _verify_signed(self, token: str) -> Principal:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid() from None
        if (
            header.get("alg") not in self._algorithms
            or header.get("typ") != "at+jwt"
            or not isinstance(header.get("kid"), str)
            or _FORBIDDEN_HEADERS & set(header)
        ):
            raise _invalid()
        key = await self._key(header["kid"])
        if key.algorithm_name != header["alg"]:
            raise _invalid()
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise _expired() from None
        except jwt.PyJWTError:
            raise _invalid() from None
        principal = Principal(
            user_id=str(claims["sub"]),
            session_id=str(claims["sid"]),
            device_id=str(claims["did"]),
            roles=tuple(str(r) for r in claims["roles"]),
            jti=str(claims["jti"]),
            expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
        )
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = (header["kid"], float(claims["iat"]), principal)
        return principal
