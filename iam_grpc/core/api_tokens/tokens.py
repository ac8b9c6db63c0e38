"""Personal API tokens: create, list, revoke, rotate, verify.

Invariants:

- A secret is shown once; SQL holds only its keyed hash (HMAC under the ``api_token`` sub-key of
  the master key, one hash per master-key version for lookups across a key rotation).
- A secret of the wrong shape or checksum is TOKEN_INVALID without a lookup.
- A verification is remembered in this process's memory, keyed by the secret's hash, for at most
  :attr:`DenyList.memory` (an access token's lifetime plus leeway). Every later check from memory
  asks the deny-list (one round trip, as an access token does); a revoked or rotated-away secret
  is recorded there, in SQL first and in the cache after the commit, for that same time. So a
  revocation is seen by every replica at once, and reading SQL is the fallback whenever the
  deny-list cache cannot be trusted.
- ``last_used_at`` is noted in memory and written by a batched flush (:meth:`ApiTokens.flush_use`),
  never by a verification.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from iam_grpc.core.api_tokens.secrets import display_prefix, new_secret, well_formed
from iam_grpc.core.call import current_call
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.validation import Violations, check_name
from iam_grpc.errors import (
    InvalidArgument,
    IpNotAllowed,
    ReauthRequired,
    ScopeRequired,
    SessionRevoked,
    TokenExpired,
    TokenInvalid,
    TokenLimit,
)
from iam_grpc.ids import ULID_RE, new_ulid
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import ApiTokenRecord

__all__ = [
    "SCOPE",
    "ApiTokenPolicy",
    "ApiTokens",
    "IssuedApiToken",
    "NewApiToken",
    "VerifiedApiToken",
    "end_user_api_tokens",
]

SCOPE = re.compile(r"^[a-z0-9:._-]{1,64}\Z")
_MAX_LIST = 32
_CACHE_SIZE = 4096
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ApiTokenPolicy:
    max_per_user: int = 20  # api_tokens.max_per_user
    max_ttl: timedelta = timedelta(days=3650)
    max_auth_age: timedelta = timedelta(minutes=15)  # the recent sign-in rule (email_change.max_auth_age)


@dataclass(frozen=True, slots=True)
class NewApiToken:
    name: str
    scopes: Sequence[str]
    ttl: timedelta | None
    allowed_cidrs: Sequence[str]


@dataclass(frozen=True, slots=True)
class IssuedApiToken:
    token: ApiTokenRecord
    secret: str  # shown once


@dataclass(frozen=True, slots=True)
class VerifiedApiToken:
    token_id: str
    user_id: str
    scopes: tuple[str, ...]
    networks: tuple[Network, ...]
    expires_at: datetime | None
    row_hash: str  # the hash SQL holds (deny-list entries are written under it)
    until: float  # monotonic time this memory of the check ends


def _caller() -> str:
    call = current_call()
    return call.caller.id if call is not None and call.caller is not None else "anonymous"


def _check_form(form: NewApiToken, violations: Violations) -> tuple[str, list[str], list[str]]:
    name = check_name(violations, "name", form.name, required=True)
    scopes = sorted(set(form.scopes))
    if len(form.scopes) > _MAX_LIST:
        violations.add("scopes", "at most 32 scopes")
    elif not all(SCOPE.match(s) for s in scopes):
        violations.add("scopes", "each scope matches ^[a-z0-9:._-]{1,64}$")
    cidrs: list[str] = []
    if len(form.allowed_cidrs) > _MAX_LIST:
        violations.add("allowed_cidrs", "at most 32 networks")
    else:
        for raw in form.allowed_cidrs:
            try:
                cidrs.append(str(ipaddress.ip_network(raw.strip(), strict=False)))
            except ValueError:
                violations.add("allowed_cidrs", "each entry is an IPv4 or IPv6 network (CIDR)")
                break
    return name, scopes, sorted(set(cidrs))


async def end_user_api_tokens(
    tx: Transaction, denylist: DenyList, user_id: str, reason: str, now: datetime
) -> list[str]:
    """Revoke every API token of a user in ``tx`` (disable, delete); returns the secret hashes to
    pass to :meth:`DenyList.revoke_api_secrets` after the commit."""
    hashes = await tx.api_tokens.revoke_all(user_id, reason, now)
    await denylist.record_api_secrets(tx, hashes)
    return hashes


class ApiTokens:
    def __init__(
        self,
        run: Runtime,
        material: SecretMaterial,
        access: AccessTokens,
        denylist: DenyList,
        policy: ApiTokenPolicy,
    ) -> None:
        self._run = run
        self._material = material
        self._access = access
        self._denylist = denylist
        self._policy = policy
        self._verified: dict[str, VerifiedApiToken] = {}
        self._used: dict[str, datetime] = {}

    # the owner's RPCs --------------------------------------------------------------------------

    async def _signed_in(self, client: ClientInfo, access_token: str) -> AccessClaims:
        return await self._access.verify_from_device(access_token, client.device_id)

    async def _recently(self, claims: AccessClaims) -> None:
        """The recent sign-in rule of sensitive changes (as RequestEmailChange): the session's last
        sign-in or step-up within ``max_auth_age``, else REAUTH_REQUIRED."""
        async with self._run.db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(claims.session_id)
            user = await tx.users.get(claims.user_id)
        if session is None or session.revoked_at is not None or user is None or user.status != "active":
            raise SessionRevoked()
        if self._run.clock.now() - session.auth_at > self._policy.max_auth_age:
            raise ReauthRequired()

    def _hashed(self, secret: str) -> tuple[str, int]:
        return self._material.keyed_hash("api_token", secret), self._material.version

    async def create(self, client: ClientInfo, access_token: str, form: NewApiToken) -> IssuedApiToken:
        violations = Violations()
        name, scopes, cidrs = _check_form(form, violations)
        if form.ttl is not None and not timedelta(minutes=1) <= form.ttl <= self._policy.max_ttl:
            violations.add("ttl", "must be unset or between 1 minute and 3650 days")
        violations.raise_any()
        claims = await self._signed_in(client, access_token)
        await self._run.limiter.hit("api_token.create_user", claims.user_id)
        await self._recently(claims)
        now = self._run.clock.now()
        secret = new_secret()
        secret_hash, version = self._hashed(secret)
        token = ApiTokenRecord(
            id=new_ulid(now),
            user_id=claims.user_id,
            name=name,
            prefix=display_prefix(secret),
            secret_hash=secret_hash,
            key_version=version,
            scopes=scopes,
            allowed_cidrs=cidrs,
            created_at=now,
            expires_at=now + form.ttl if form.ttl is not None else None,
        )
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            if await tx.api_tokens.count_live(claims.user_id, now) >= self._policy.max_per_user:
                raise TokenLimit()
            await tx.api_tokens.insert(token)
            details = {"token_id": token.id, "name": name, "scopes": scopes}
            await audit.record(
                audit.event(
                    "api_token.created",
                    "ok",
                    user_id=claims.user_id,
                    session_id=claims.session_id,
                    details=details,
                ),
                tx,
            )
        return IssuedApiToken(token, secret)

    async def list(self, client: ClientInfo, access_token: str) -> list[ApiTokenRecord]:
        claims = await self._signed_in(client, access_token)
        async with self._run.db.transaction(read_only=True) as tx:
            tokens = await tx.api_tokens.live_of(claims.user_id, self._run.clock.now())
        return [self._with_recent_use(t) for t in tokens]

    def _with_recent_use(self, token: ApiTokenRecord) -> ApiTokenRecord:
        noted = self._used.get(token.id)
        if noted is None or (token.last_used_at is not None and token.last_used_at >= noted):
            return token
        return replace(token, last_used_at=noted)

    async def revoke(self, client: ClientInfo, access_token: str, token_id: str) -> None:
        """Idempotent, and silent about tokens of other users."""
        claims = await self._signed_in(client, access_token)
        if not ULID_RE.match(token_id):
            return
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            token = await tx.api_tokens.get(token_id)
            if token is None or token.user_id != claims.user_id or token.revoked_at is not None:
                return
            await tx.api_tokens.revoke(token_id, "user", self._run.clock.now())
            await self._denylist.record_api_secrets(tx, [token.secret_hash])
            await audit.record(
                audit.event(
                    "api_token.revoked",
                    "ok",
                    user_id=claims.user_id,
                    session_id=claims.session_id,
                    details={"token_id": token_id, "reason": "user"},
                ),
                tx,
            )
        await self.forget([token.secret_hash])

    async def rotate(self, client: ClientInfo, access_token: str, token_id: str) -> IssuedApiToken:
        claims = await self._signed_in(client, access_token)
        await self._run.limiter.hit("api_token.create_user", claims.user_id)
        await self._recently(claims)
        now = self._run.clock.now()
        secret = new_secret()
        secret_hash, version = self._hashed(secret)
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            old = await tx.api_tokens.get(token_id) if ULID_RE.match(token_id) else None
            if (
                old is None
                or old.user_id != claims.user_id
                or old.revoked_at is not None
                or (old.expires_at is not None and old.expires_at <= now)
                or not await tx.api_tokens.replace_secret(
                    token_id, old.secret_hash, display_prefix(secret), secret_hash, version, now
                )
            ):
                raise InvalidArgument.one("token_id", "is not one of your live API tokens")
            await self._denylist.record_api_secrets(tx, [old.secret_hash])
            await audit.record(
                audit.event(
                    "api_token.rotated",
                    "ok",
                    user_id=claims.user_id,
                    session_id=claims.session_id,
                    details={"token_id": token_id},
                ),
                tx,
            )
        await self.forget([old.secret_hash])
        rotated = replace(
            old, prefix=display_prefix(secret), secret_hash=secret_hash, key_version=version, rotated_at=now
        )
        return IssuedApiToken(rotated, secret)

    async def forget(self, secret_hashes: Sequence[str]) -> None:
        """After a commit that ended these secrets: out of this process's memory, onto the
        deny-list for every other."""
        dead = set(secret_hashes)
        for key in [k for k, v in self._verified.items() if v.row_hash in dead]:
            self._verified.pop(key, None)
        await self._denylist.revoke_api_secrets(dead)

    # verification -------------------------------------------------------------------------------

    async def verify(self, secret: str, ip: str, required_scopes: Sequence[str]) -> VerifiedApiToken:
        """VerifyApiToken. Failures of the secret itself are counted per caller
        (``api_token.caller_invalid``); past its limit they answer RATE_LIMITED."""
        try:
            found = await self._find(secret)
            self._check_expiry(found)
        except (TokenInvalid, TokenExpired):
            await self._run.limiter.hit("api_token.caller_invalid", _caller())
            raise
        if found.networks:
            address = parse_ip(ip) if ip else None
            if address is None or not any(address in network for network in found.networks):
                raise IpNotAllowed()
        missing = [s for s in required_scopes if s not in found.scopes]
        if missing:
            raise ScopeRequired(missing)
        self._used[found.token_id] = self._run.clock.now()
        return found

    def _check_expiry(self, found: VerifiedApiToken) -> None:
        if found.expires_at is not None and found.expires_at <= self._run.clock.now():
            raise TokenExpired()

    async def _find(self, secret: str) -> VerifiedApiToken:
        if not well_formed(secret):
            raise TokenInvalid()
        key = self._material.keyed_hash("api_token", secret)
        cached = self._verified.get(key)
        if cached is not None and cached.until > time.monotonic():
            dead = await self._denylist.api_secret_dead(cached.row_hash)
            if dead is False:
                return cached
            self._verified.pop(key, None)
            if dead is True:
                raise TokenInvalid()
        found = await self._from_sql(secret)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[key] = found
        return found

    async def _from_sql(self, secret: str) -> VerifiedApiToken:
        hashes = [h for _, h in self._material.keyed_hashes("api_token", secret)]
        async with self._run.db.transaction(read_only=True) as tx:
            token = await tx.api_tokens.by_hash(hashes)
            user = await tx.users.get(token.user_id) if token is not None else None
        if token is None or token.revoked_at is not None or user is None or user.status != "active":
            raise TokenInvalid()
        return VerifiedApiToken(
            token_id=token.id,
            user_id=token.user_id,
            scopes=tuple(token.scopes),
            networks=tuple(ipaddress.ip_network(c, strict=False) for c in token.allowed_cidrs),
            expires_at=token.expires_at,
            row_hash=token.secret_hash,
            until=time.monotonic() + self._denylist.memory.total_seconds(),
        )

    # last use --------------------------------------------------------------------------------------

    async def flush_use(self) -> int:
        """Write the noted uses in one transaction (the ``api-token-use`` job); kept for the next
        flush when SQL fails."""
        if not self._used:
            return 0
        used, self._used = self._used, {}
        try:
            async with self._run.db.transaction() as tx:
                await tx.api_tokens.record_use(used)
        except Exception:
            for token_id, at in used.items():
                self._used.setdefault(token_id, at)
            raise
        return len(used)
