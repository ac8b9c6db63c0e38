"""Refresh (behaviour.md 1.5): rotating a refresh token, once, whoever asks how often.

Every Refresh rotates the token in one SQL transaction (a compare-and-set on ``state``, see
:mod:`iam_grpc.core.tokens.rotation`). Concurrent refreshes within ``refresh.grace`` converge on
one successor through a result sealed under the presented token (a single-flight lock in the
ephemeral store makes the others wait for it); a rotated token presented after the grace window
is a replay, and the whole session ends (``REFRESH_TOKEN_REUSED``), whoever rotated first.

Before rotating, the :class:`RefreshCheck` (the anomaly checks of ``iam_grpc.core.anomalies``)
judges the request inside the rotation's transaction: it may answer a challenge instead of a
session, refuse, or ask for bookkeeping with the rotation.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from iam_grpc.core.challenges import Challenge
from iam_grpc.core.client import AgentParser, ClientInfo, ParsedAgent
from iam_grpc.core.crypto import SealError, open_with_secret, seal_with_secret
from iam_grpc.core.mail.notices import queue_security_alert
from iam_grpc.core.ratelimit import ip_key
from iam_grpc.core.risk import POINTS, RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.rotation import AfterRotation, IssuedSession, RotatedMeanwhile, SessionTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.errors import (
    BackendUnavailable,
    RefreshTokenReused,
    SessionExpired,
    SessionRevoked,
    TokenInvalid,
)
from iam_grpc.ids import REFRESH_TOKEN
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Ephemeral, Transaction
from iam_grpc.storage.records import RefreshToken, SessionRecord, TokenContext, User, UserDevice

__all__ = ["RefreshCheck", "RefreshContext", "RefreshPolicy", "RefreshRotation", "RefreshVerdict", "Refusal"]

log = component_logger("iam.sessions")

_LOCK_TTL = timedelta(seconds=5)
_POLL = 0.05
_PENDING = b"pending:"  # the single-flight lock's value starts so (and the holder's own nonce
# follows); a sealed result (2-byte key version, then nonce) never does
_GRACE_PURPOSE = b"refresh-grace"


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    grace: timedelta = timedelta(seconds=15)
    reuse_mfa_hold: timedelta = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class RefreshContext:
    """What the anomaly checks see of a Refresh before rotation."""

    client: ClientInfo
    agent: ParsedAgent
    user: User
    session: SessionRecord
    token: RefreshToken
    link: UserDevice | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refresh check's hard answer: committed (audit rows, a session ended in ``tx``), then
    raised."""

    error: Exception
    ended_session: str | None = None


RefreshVerdict = AfterRotation | Refusal | Challenge | None
"""Rotate with extra bookkeeping; refuse; answer a challenge instead of a session; rotate."""


class RefreshCheck(Protocol):
    """The seam where anomaly evaluation plugs in: return a challenge to answer instead of a
    Session, a :class:`Refusal` (or raise an IamError) to refuse, :class:`AfterRotation` to rotate
    with extra bookkeeping, or None to rotate."""

    async def __call__(self, context: RefreshContext, tx: Transaction) -> RefreshVerdict: ...


class RefreshRotation:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        tokens: SessionTokens,
        sessions: Sessions,
        agents: AgentParser,
        risk: RiskScores,
        policy: RefreshPolicy,
        *,
        check: RefreshCheck | None = None,
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._tokens = tokens
        self._sessions = sessions
        self._agents = agents
        self._risk = risk  # points for invalid tokens and detected reuse (behaviour.md 3.3)
        self._policy = policy
        self._check = check  # None: with every anomaly check off, Refresh does not pay for the seam

    async def refresh(self, client: ClientInfo, raw: str) -> IssuedSession | Challenge:
        """Rotate ``raw`` (behaviour.md 1.5); returns a Session, or the challenge the refresh check
        answered."""
        if not REFRESH_TOKEN.match(raw):
            raise TokenInvalid()  # never looked up: a stored hash is not a token
        digest = self._tokens.token_hash(raw)
        await self._run.limiter.hit("refresh.token", digest)
        # One key per presented token: first the single-flight lock (_PENDING), then, replacing
        # it, the sealed result of the rotation, kept for the grace window.
        result_key = f"rf:res:{{{digest}}}"
        lock = _PENDING + secrets.token_bytes(12)
        holds_lock = await self._single_flight(result_key, lock)
        answer: IssuedSession | Challenge | None = None
        try:
            for _attempt in range(3):
                answer = await self._refresh_once(client, raw, result_key)
                if answer is not None:
                    return answer
            raise BackendUnavailable()
        finally:
            # A rotation left its sealed result in place of the lock; any other outcome frees it.
            if holds_lock and not isinstance(answer, IssuedSession):
                # Only our own lock, atomically: not a sealed result that replaced it (a rotation
                # that committed before an error stays recoverable in the grace window, S33), nor
                # another request's lock taken after ours expired.
                await self._quietly(self._ephemeral.delete_if(result_key, lock))

    async def _single_flight(self, result_key: str, lock: bytes) -> bool:
        """One rotation at a time per token; others wait until the key holds the sealed result or
        is gone (an optimisation only: the SQL compare-and-set is the truth)."""
        try:
            if await self._ephemeral.set_if_absent(result_key, lock, _LOCK_TTL):
                return True
            deadline = asyncio.get_running_loop().time() + _LOCK_TTL.total_seconds()
            while asyncio.get_running_loop().time() < deadline:
                value = await self._ephemeral.get(result_key)
                if value is None or not value.startswith(_PENDING):
                    break
                await asyncio.sleep(_POLL)
        except BackendUnavailable:
            pass
        return False

    async def _quietly(self, operation: Awaitable[object]) -> None:
        try:
            await operation
        except BackendUnavailable:
            log.warning("ephemeral store failed; continuing")

    async def _refresh_once(
        self, client: ClientInfo, raw: str, result_key: str
    ) -> IssuedSession | Challenge | None:
        """Steps 4-9 of behaviour.md 1.5 in one transaction: load, check, rotate, seal, commit.
        None: another request rotated first; look again (it is now a grace case)."""
        now = self._run.clock.now()
        metrics, audit = self._run.metrics, self._run.audit
        ended: str | None = None
        reused = False
        answer: IssuedSession | Challenge | Refusal | None = None
        try:
            async with self._run.db.transaction() as tx:
                found = await self._tokens.find(tx, raw)
                if found is None:
                    await self._invalid(client)
                    raise TokenInvalid()
                token, session, user = found.token, found.session, found.user
                if session.revoked_at is not None or token.state == "revoked" or user.status != "active":
                    metrics.refreshes.labels("revoked").inc()
                    raise SessionRevoked()
                if session.absolute_expires_at <= now:
                    if await tx.sessions.end(session.id, "expired", now):
                        await audit.sessions_revoked(tx, user.id, [session.id], "expired")
                    ended = "absolute"
                elif token.state == "active" and token.expires_at <= now:
                    if await tx.sessions.end(session.id, "idle", now):
                        await audit.sessions_revoked(tx, user.id, [session.id], "idle")
                    ended = "idle"
                elif token.state == "rotated":
                    assert token.used_at is not None
                    if now - token.used_at <= self._policy.grace:
                        graced = await self._grace(tx, raw, token, result_key)
                        metrics.refreshes.labels("grace").inc()
                        return graced
                    await self._reuse(tx, user, session, token, now)
                    reused = True
                else:
                    answer = await self._rotate(tx, client, raw, found, result_key, now)
        except RotatedMeanwhile:
            return None
        if ended is not None:
            await self._sessions.after_revocations([session.id])
            metrics.refreshes.labels("expired").inc()
            raise SessionExpired(ended)
        if reused:
            await self._sessions.after_revocations([session.id])
            await self._risk_event("token_reuse", replace(client, device_id=session.device_id))
            metrics.refreshes.labels("reuse").inc()
            raise RefreshTokenReused()
        if isinstance(answer, Refusal):
            if answer.ended_session is not None:
                await self._sessions.after_revocations([answer.ended_session])
            metrics.refreshes.labels("blocked").inc()
            raise answer.error
        await self._run.failpoints.hit("refresh.after_commit")
        if isinstance(answer, IssuedSession):
            metrics.refreshes.labels("rotated").inc()
        return answer

    async def _risk_event(self, event: str, client: ClientInfo) -> None:
        ip_points, device_points = POINTS[event]
        await self._risk.add(
            ip=client.ip, device_id=client.device_id or None, ip_points=ip_points, device_points=device_points
        )

    async def _invalid(self, client: ClientInfo) -> None:
        """An unknown token: count it against the IP (refresh.ip_invalid)."""
        self._run.metrics.refreshes.labels("invalid").inc()
        await self._risk_event("invalid_refresh", client)
        await self._run.limiter.hit("refresh.ip_invalid", ip_key(client.ip))

    async def _grace(self, tx: Transaction, raw: str, token: RefreshToken, result_key: str) -> IssuedSession:
        """A concurrent or retried refresh inside the grace window: the same successor, or TOKEN_INVALID."""
        try:
            sealed = await self._ephemeral.get(result_key)
        except BackendUnavailable:
            sealed = None
        if sealed is None or sealed.startswith(_PENDING) or token.successor_id is None:
            raise TokenInvalid()  # the store lost it, or the rotation never committed: nothing is revoked
        try:
            result = IssuedSession.from_json(open_with_secret(raw.encode(), _GRACE_PURPOSE, sealed))
        except (SealError, ValueError):
            raise TokenInvalid() from None
        successor = await tx.sessions.token(token.successor_id)
        if successor is None or successor.state == "revoked":
            raise TokenInvalid()
        if not self._tokens.is_hash_of(result.refresh_token, successor):
            # the sealed pair is from a rotation that rolled back; the committed one's was lost
            raise TokenInvalid()
        return result

    async def _reuse(
        self, tx: Transaction, user: User, session: SessionRecord, token: RefreshToken, now: datetime
    ) -> None:
        """A replayed token: end the session and its whole chain, distrust the device, hold MFA, alert."""
        audit = self._run.audit
        await tx.sessions.revoke(session.id, "reuse", now)
        link = await tx.devices.get_link(user.id, session.device_id)
        if link is not None:
            await audit.untrust_devices(tx, [link], now, "reuse")
        await tx.users.set_mfa_hold(user.id, now + self._policy.reuse_mfa_hold, now)
        details = {
            "generation": token.generation,
            "rotated_at": token.used_at.isoformat() if token.used_at else None,
        }
        await audit.record(
            audit.event(
                "refresh.reuse_detected",
                "fail",
                user_id=user.id,
                session_id=session.id,
                device_id=session.device_id,
                details=details,
            ),
            tx,
        )
        await audit.record(
            audit.event(
                "session.revoked", "info", user_id=user.id, session_id=session.id, details={"reason": "reuse"}
            ),
            tx,
        )
        await queue_security_alert(
            self._run.mailer,
            tx,
            user,
            what="an old sign-in token was used again, which happens when it has been copied",
            now=now,
            dedupe_scope=session.id,
        )
        log.bind(user_id=user.id, session_id=session.id).warning("refresh token reuse: session ended")

    async def _rotate(
        self,
        tx: Transaction,
        client: ClientInfo,
        raw: str,
        found: TokenContext,
        result_key: str,
        now: datetime,
    ) -> IssuedSession | Challenge | Refusal:
        """Step 8: the check, the compare-and-set, the successor and the bookkeeping, inside the
        caller's transaction."""
        presented, session, user = found.token, found.session, found.user
        agent = self._agents.parse(client.user_agent)
        after: AfterRotation | None = None
        if self._check is not None:
            verdict = await self._check(
                RefreshContext(client, agent, user, session, presented, found.link), tx
            )
            if isinstance(verdict, AfterRotation):
                after = verdict
            elif verdict is not None:
                return verdict
        issued = await self._tokens.rotate_in(tx, client, agent, found, now, after)
        # Sealed under the presented token before COMMIT: a retry whose answer got lost gets it back.
        sealed = seal_with_secret(raw.encode(), _GRACE_PURPOSE, issued.to_json())
        await self._quietly(
            self._ephemeral.set(result_key, sealed, self._policy.grace + timedelta(seconds=5))
        )
        await self._run.failpoints.hit("refresh.before_commit")
        return issued
