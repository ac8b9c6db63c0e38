"""Verifying other providers' OpenID Connect ID tokens (``SignInWithIdToken``, ``LinkIdentity``).

Each configured provider names its issuer, the client ids its tokens may be issued to, and where
its keys are: a JWKS URL or a file. Keys are cached for ``oidc.jwks_cache_ttl``; a token signed
with a kid the cache does not know refetches the set (a provider rotated its keys), at most once
per ``oidc.jwks_refetch_interval`` per provider, so a stream of tokens with made-up kids cannot
make us hammer the provider. Fetches run off the event loop (urllib in a thread) with a timeout
and a size cap. Every failure is the one answer ``ID_TOKEN_INVALID``; the log says which check.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, NoReturn

import jwt

from iam_grpc.config.signin import OidcProvider, OidcSettings
from iam_grpc.core.federated_claims import IdClaims
from iam_grpc.errors import IdTokenInvalid
from iam_grpc.logging import component_logger

__all__ = ["OidcVerifier"]

log = component_logger("iam.oidc")

_MAX_TOKEN = 16 * 1024


@dataclass(slots=True)
class _KeyCache:
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = float("-inf")
    refetched_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class OidcVerifier:
    """The :class:`~iam_grpc.core.federated_claims.IdTokenVerifier` over the configured providers."""

    def __init__(self, settings: OidcSettings) -> None:
        self._settings = settings
        self._caches: dict[str, _KeyCache] = {name: _KeyCache() for name in settings.providers}

    def knows(self, provider: str) -> bool:
        return provider in self._settings.providers

    async def verify(self, provider: str, id_token: str, nonce: str) -> IdClaims:
        config = self._settings.providers.get(provider)
        if config is None or not id_token or len(id_token) > _MAX_TOKEN or not nonce:
            raise IdTokenInvalid()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            self._refused(provider, "malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            self._refused(provider, "algorithm")
        key = await self._key(provider, config, header.get("kid"))
        if key is None:
            self._refused(provider, "unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key.key,
                algorithms=[alg],
                audience=config.client_ids,
                issuer=config.issuer,
                leeway=self._settings.leeway,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            self._refused(provider, "expired")
        except jwt.InvalidAudienceError:
            self._refused(provider, "audience")
        except jwt.InvalidIssuerError:
            self._refused(provider, "issuer")
        except jwt.PyJWTError:
            self._refused(provider, "signature or claims")
        presented = claims.get("nonce")
        if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), nonce.encode()):
            self._refused(provider, "nonce")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if len(audiences) > 1 and (not isinstance(azp, str) or azp not in config.client_ids):
            self._refused(provider, "authorized party")  # OIDC Core 3.1.3.7, steps 4 and 5
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255 or not subject.isascii():
            self._refused(provider, "subject")
        email = claims.get("email")
        return IdClaims(
            provider=provider,
            subject=subject,
            email=email if isinstance(email, str) else "",
            email_verified=claims.get("email_verified") is True or claims.get("email_verified") == "true",
            name=_text(claims.get("given_name") or claims.get("name")),
            last_name=_text(claims.get("family_name")),
            expires_at=float(claims["exp"]),
        )

    def _refused(self, provider: str, check: str) -> NoReturn:
        log.bind(provider=provider, check=check).info("id token refused")
        raise IdTokenInvalid()

    async def _key(self, provider: str, config: OidcProvider, kid: object) -> jwt.PyJWK | None:
        cache = self._caches[provider]
        now = time.monotonic()
        if now - cache.fetched_at > self._settings.jwks_cache_ttl.total_seconds():
            await self._refresh(provider, config, cache, forced=False)
        found = _pick(cache.keys, kid)
        if found is None and now - cache.refetched_at >= self._settings.jwks_refetch_interval.total_seconds():
            await self._refresh(provider, config, cache, forced=True)  # the provider may have rotated
            found = _pick(cache.keys, kid)
        return found

    async def _refresh(self, provider: str, config: OidcProvider, cache: _KeyCache, *, forced: bool) -> None:
        started = time.monotonic()
        async with cache.lock:
            # another call refreshed while this one waited: use its result
            if (cache.refetched_at if forced else cache.fetched_at) >= started:
                return
            try:
                raw = await asyncio.to_thread(self._read, config)
                keys = _parse(raw)
            except (OSError, ValueError) as error:
                log.bind(provider=provider, error=type(error).__name__).warning("jwks fetch failed")
                keys = None
            now = time.monotonic()
            cache.refetched_at = now
            if keys is not None:
                cache.keys = keys
                cache.fetched_at = now
            elif not cache.keys:
                cache.fetched_at = now - self._settings.jwks_cache_ttl.total_seconds() + 5  # retry soon

    def _read(self, config: OidcProvider) -> bytes:
        limit = self._settings.max_jwks_bytes
        if config.jwks_file is not None:
            with open(config.jwks_file, "rb") as handle:
                data = handle.read(limit + 1)
        else:
            assert config.jwks_url is not None
            request = urllib.request.Request(config.jwks_url, headers={"Accept": "application/json"})  # noqa: S310 - http(s) only, checked at startup
            timeout = self._settings.jwks_fetch_timeout.total_seconds()
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) checked
                data = answer.read(limit + 1)
        if len(data) > limit:
            raise ValueError("jwks too large")
        return data


def _parse(raw: bytes) -> dict[str, jwt.PyJWK]:
    document = json.loads(raw)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS")
    keys: dict[str, jwt.PyJWK] = {}
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # a key type or algorithm we do not use
        keys[str(entry.get("kid") or f"#{index}")] = key
    return keys


def _pick(keys: dict[str, jwt.PyJWK], kid: object) -> jwt.PyJWK | None:
    if isinstance(kid, str) and kid:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


def _text(value: object) -> str:
    return value.strip()[:100] if isinstance(value, str) else ""
