"""A session's token chain (behaviour.md 1.5): minting the first refresh token with its access
token, and each successor by a compare-and-set on the presented one.

A session owns a chain of refresh tokens, exactly one ``active`` while it lives. A successor is
inserted, then the presented token moves from ``active`` to ``rotated`` in the same transaction;
when that compare-and-set finds the token already rotated, :class:`RotatedMeanwhile` rolls the
transaction back, and the caller looks again (now a grace case). Only a keyed hash of each
refresh token is stored.

This is the part of Refresh that completing a refresh challenge (``iam_grpc.core.mfa``) shares,
so that neither depends on the other.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from iam_grpc.core.client import ClientInfo, ParsedAgent
from iam_grpc.core.crypto import SecretMaterial, constant_time_equal
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.errors import ChallengeExpired
from iam_grpc.ids import new_refresh_token
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import RefreshToken, SessionRecord, TokenContext, User

__all__ = ["AfterRotation", "IssuedSession", "RotatedMeanwhile", "SessionPolicy", "SessionTokens"]


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    absolute_ttl: timedelta = timedelta(days=30)
    idle_ttl: timedelta = timedelta(days=7)
    max_per_user: int = 10
    trust_idle: timedelta = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class IssuedSession:
    access_token: str
    access_expires_at: datetime
    refresh_token: str
    refresh_expires_at: datetime
    session_id: str
    user_id: str
    device_id: str

    def to_json(self) -> bytes:
        """For sealing: a retry whose answer got lost is given the same session."""
        return json.dumps(
            {
                "access_token": self.access_token,
                "access_expires_at": self.access_expires_at.isoformat(),
                "refresh_token": self.refresh_token,
                "refresh_expires_at": self.refresh_expires_at.isoformat(),
                "session_id": self.session_id,
                "user_id": self.user_id,
                "device_id": self.device_id,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> IssuedSession:
        """Raises ValueError on text that is not JSON."""
        result = json.loads(raw)
        return cls(
            access_token=result["access_token"],
            access_expires_at=datetime.fromisoformat(result["access_expires_at"]),
            refresh_token=result["refresh_token"],
            refresh_expires_at=datetime.fromisoformat(result["refresh_expires_at"]),
            session_id=result["session_id"],
            user_id=result["user_id"],
            device_id=result["device_id"],
        )


@dataclass(frozen=True, slots=True)
class AfterRotation:
    """What a passing refresh check wants done in the rotation's transaction: the device the
    session moves to (before the successor is minted) and bookkeeping once it is."""

    apply: Callable[[Transaction, IssuedSession], Awaitable[None]]
    device_id: str | None = None
    location: tuple[str | None, str | None, str | None] = (None, None, None)  # country, region, city


class RotatedMeanwhile(Exception):
    """The compare-and-set lost: another request rotated the token first."""


class SessionTokens:
    def __init__(
        self, runtime: Runtime, material: SecretMaterial, access: AccessTokens, policy: SessionPolicy
    ) -> None:
        self._run = runtime
        self._material = material
        self._access = access
        self._policy = policy

    # hashing ---------------------------------------------------------------------------

    def token_hash(self, raw: str) -> str:
        return self._material.keyed_hash("refresh", raw)

    def is_hash_of(self, raw: str, stored: RefreshToken) -> bool:
        """Whether ``stored`` is the row of ``raw`` (under the key version it was hashed with)."""
        return constant_time_equal(
            self._material.keyed_hash("refresh", raw, stored.key_version), stored.token_hash
        )

    async def find(self, tx: Transaction, raw: str) -> TokenContext | None:
        """The presented token with its session and user, under any master-key version."""
        for _version, digest in self._material.keyed_hashes("refresh", raw):
            found = await tx.sessions.token_with_context(digest)
            if found is not None:
                return found
        return None

    # minting ---------------------------------------------------------------------------

    async def issue(
        self,
        tx: Transaction,
        user: User,
        session: SessionRecord,
        device_id: str,
        *,
        generation: int,
        now: datetime,
        roles: list[str] | None = None,
    ) -> tuple[IssuedSession, int]:
        """A refresh token of ``generation`` and an access token, inside ``tx``; returns the
        session and the new token's row id."""
        raw = new_refresh_token()
        expires = min(now + self._policy.idle_ttl, session.absolute_expires_at)
        if roles is None:
            roles = await tx.users.roles_of(user.id)
        minted = self._access.mint(
            user_id=user.id,
            session_id=session.id,
            device_id=device_id,
            roles=roles,
            auth_time=session.auth_at,
        )
        token_id = await tx.sessions.insert_token(
            RefreshToken(
                session_id=session.id,
                token_hash=self.token_hash(raw),
                key_version=self._material.version,
                generation=generation,
                state="active",
                created_at=now,
                expires_at=expires,
                access_jti=minted.claims.jti,
            )
        )
        issued = IssuedSession(
            access_token=minted.token,
            access_expires_at=minted.claims.expires_at,
            refresh_token=raw,
            refresh_expires_at=expires,
            session_id=session.id,
            user_id=user.id,
            device_id=device_id,
        )
        return issued, token_id

    # rotating --------------------------------------------------------------------------

    async def rotate_in(
        self,
        tx: Transaction,
        client: ClientInfo,
        agent: ParsedAgent,
        found: TokenContext,
        now: datetime,
        after: AfterRotation | None = None,
    ) -> IssuedSession:
        """The successor, the compare-and-set on the presented token and the session bookkeeping,
        inside ``tx``. Raises :class:`RotatedMeanwhile` when another request rotated first."""
        presented, session, user = found.token, found.session, found.user
        device_id = session.device_id
        if after is not None and after.device_id and after.device_id != device_id:
            device_id = after.device_id
            await tx.sessions.rebind(session.id, device_id)
        issued, successor_id = await self.issue(
            tx,
            user,
            session,
            device_id,
            generation=presented.generation + 1,
            now=now,
            roles=list(found.roles),
        )
        await self._run.failpoints.hit("refresh.after_insert")
        if not await tx.sessions.mark_rotated(presented.id or 0, successor_id, now):
            raise RotatedMeanwhile()  # someone else rotated first: roll back, look again (grace)
        country, region, city = after.location if after is not None else (None, None, None)
        await tx.sessions.touch(
            session.id,
            now,
            ip=client.ip,
            browser=agent.browser_family,
            os=agent.os_family,
            country=country,
            region=region,
            city=city,
        )
        if after is not None:
            await after.apply(tx, issued)
        else:
            await tx.devices.touch_link(user.id, device_id, now, client.ip)
        return issued

    async def rotate_for_challenge(
        self, token_hash: str, client: ClientInfo, agent: ParsedAgent, after: AfterRotation
    ) -> IssuedSession:
        """Complete a refresh challenge (behaviour.md 3.4): rotate the token it was raised for, by
        its stored hash. Anything but a live active token is CHALLENGE_EXPIRED; the session is
        then judged by check 1 at its next Refresh."""
        now = self._run.clock.now()
        try:
            async with self._run.db.transaction() as tx:
                found = await tx.sessions.token_with_context(token_hash)
                if (
                    found is None
                    or found.token.state != "active"
                    or found.token.expires_at <= now
                    or found.session.revoked_at is not None
                    or found.session.absolute_expires_at <= now
                    or found.user.status != "active"
                ):
                    raise ChallengeExpired()
                issued = await self.rotate_in(tx, client, agent, found, now, after)
        except RotatedMeanwhile:
            raise ChallengeExpired() from None
        self._run.metrics.refreshes.labels("rotated").inc()
        return issued
