"""Sessions and their refresh-token chains (behaviour.md 1.5-1.7).

A session is one sign-in of one user on one device. It owns a chain of
refresh tokens, exactly one ``active`` while it lives. Every Refresh rotates
the token in one SQL transaction (a compare-and-set on ``state``); concurrent
refreshes within ``refresh.grace`` converge on one successor through a result
sealed under the presented token; a rotated token presented after the grace
window is a replay, and the whole session ends (``REFRESH_TOKEN_REUSED``),
whoever rotated first.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.client import AgentParser, ClientInfo, ParsedAgent
from iam_grpc.core.crypto import (
    SealError,
    SecretMaterial,
    constant_time_equal,
    open_with_secret,
    seal_with_secret,
)
from iam_grpc.core.devices import baseline_of, is_trusted
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.ratelimit import RateLimiter, ip_key
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.errors import (
    BackendUnavailable,
    ChallengeExpired,
    InvalidArgument,
    RefreshTokenReused,
    SessionExpired,
    SessionRevoked,
    TokenInvalid,
)
from iam_grpc.ids import DEVICE_ID, REFRESH_TOKEN, new_device_id, new_refresh_token, new_ulid
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database, Ephemeral, Transaction
from iam_grpc.storage.records import Device, RefreshToken, SessionRecord, TokenContext, User, UserDevice

__all__ = [
    "IssuedSession",
    "RefreshCheck",
    "RefreshContext",
    "SessionManager",
    "SessionPolicy",
    "SessionView",
]

log = component_logger("iam.sessions")

_LOCK_TTL = timedelta(seconds=5)
_POLL = 0.05
_PENDING = b"pending:"  # the single-flight lock's value starts so (and the holder's own nonce
# follows); a sealed result (2-byte key version, then nonce) never does
_GRACE_PURPOSE = b"refresh-grace"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    access_ttl: timedelta = timedelta(minutes=15)
    absolute_ttl: timedelta = timedelta(days=30)
    idle_ttl: timedelta = timedelta(days=7)
    grace: timedelta = timedelta(seconds=15)
    reuse_mfa_hold: timedelta = timedelta(days=7)
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


@dataclass(frozen=True, slots=True)
class SessionView:
    session: SessionRecord
    device: Device | None
    current: bool


@dataclass(frozen=True, slots=True)
class RefreshContext:
    """What the anomaly checks (issue 7) see of a Refresh before rotation."""

    client: ClientInfo
    agent: ParsedAgent
    user: User
    session: SessionRecord
    token: RefreshToken
    link: UserDevice | None


@dataclass(frozen=True, slots=True)
class AfterRotation:
    """What a passing refresh check wants done in the rotation's transaction: the device the
    session moves to (before the successor is minted) and bookkeeping once it is."""

    apply: Callable[[Transaction, IssuedSession], Awaitable[None]]
    device_id: str | None = None
    location: tuple[str | None, str | None, str | None] = (None, None, None)  # country, region, city


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refresh check's hard answer: committed (audit rows, a session ended in ``tx``), then
    raised."""

    error: Exception
    ended_session: str | None = None


class RefreshCheck(Protocol):
    """The seam where anomaly evaluation plugs in: return a challenge to answer instead of a
    Session, raise an IamError to refuse, return :class:`AfterRotation` to rotate with extra
    bookkeeping, or None to rotate."""

    async def __call__(self, context: RefreshContext, tx: Transaction) -> object | None: ...


class SessionManager:
    def __init__(
        self,
        db: Database,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        clock: Clock,
        access: AccessTokens,
        denylist: DenyList,
        audit: AuditTrail,
        mailer: Mailer,
        limiter: RateLimiter,
        agents: AgentParser,
        metrics: CoreMetrics,
        failpoints: Failpoints,
        policy: SessionPolicy,
    ) -> None:
        self._db = db
        self._ephemeral = ephemeral
        self._material = material
        self._clock = clock
        self._access = access
        self._denylist = denylist
        self._audit = audit
        self._mailer = mailer
        self._limiter = limiter
        self._agents = agents
        self._metrics = metrics
        self._failpoints = failpoints
        self._policy = policy
        self.refresh_check: RefreshCheck | None = None
        # Risk points for invalid tokens and detected reuse (behaviour.md 3.3), wired by the app.
        self.risk_event: Callable[[str, ClientInfo], Awaitable[None]] | None = None
        # Ends the pending challenges of revoked sessions (behaviour.md 1.6), wired by the app.
        self.sessions_ended: Callable[[list[str]], Awaitable[None]] | None = None

    @property
    def trust_idle(self) -> timedelta:
        return self._policy.trust_idle

    # hashing ---------------------------------------------------------------------------

    def token_hash(self, raw: str) -> str:
        return self._material.keyed_hash("refresh", raw)

    # devices ---------------------------------------------------------------------------

    async def resolve_device(
        self, tx: Transaction, client: ClientInfo, agent: ParsedAgent, now: datetime
    ) -> Device:
        """The client's device, updated; a new one when it sent none or an unknown one."""
        existing = await tx.devices.get(client.device_id) if DEVICE_ID.match(client.device_id) else None
        fields = {
            "user_agent": client.user_agent[:1024] or None,
            "browser_family": agent.browser_family,
            "browser_major": agent.browser_major,
            "os_family": agent.os_family,
            "os_major": agent.os_major,
            "device_brand": agent.device_brand,
            "device_model": agent.device_model,
            "device_type": agent.device_type,
        }
        if existing is None:
            device = Device(id=new_device_id(), created_at=now, last_seen_at=now, **fields)
            await tx.devices.insert(device)
            return device
        device = replace(existing, last_seen_at=now, **fields)  # type: ignore[arg-type]
        await tx.devices.update(device)
        return device

    async def link_device(
        self,
        tx: Transaction,
        user_id: str,
        device: Device,
        client: ClientInfo,
        agent: ParsedAgent,
        now: datetime,
        *,
        trust: bool,
        shape_link: Callable[[UserDevice], UserDevice] | None = None,
    ) -> UserDevice:
        """The user-device link, seen now; ``trust`` (re)grants trust with the current baseline."""
        link = await tx.devices.get_link(user_id, device.id)
        if link is None:
            link = UserDevice(user_id=user_id, device_id=device.id, first_seen_at=now, last_seen_at=now)
        link = replace(link, last_seen_at=now, last_ip=client.ip)
        if not link.baseline:
            link = replace(link, baseline=baseline_of(agent))  # first sight (behaviour.md 6.2)
        if trust and not is_trusted(link, agent, now, self._policy.trust_idle):
            link = replace(link, trusted_at=now, baseline=baseline_of(agent))
            await self._audit.record(
                self._audit.event(
                    "device.trusted", "ok", user_id=user_id, device_id=device.id, details={"by": "password"}
                ),
                tx,
            )
        if shape_link is not None:
            link = shape_link(link)
        await tx.devices.save_link(link)
        return link

    # creating --------------------------------------------------------------------------

    async def open_session(
        self,
        tx: Transaction,
        user: User,
        client: ClientInfo,
        *,
        trust_device: bool,
        mfa: bool = False,
        shape_link: Callable[[UserDevice], UserDevice] | None = None,
    ) -> tuple[IssuedSession, list[str]]:
        """Create a session, its first refresh token and an access token, inside ``tx``.

        Returns the issued session and the ids of sessions evicted by the cap, whose
        deny-list markers the caller writes after commit (see :meth:`after_revocations`).
        """
        now = self._clock.now()
        agent = self._agents.parse(client.user_agent)
        device = await self.resolve_device(tx, client, agent, now)
        await self.link_device(
            tx, user.id, device, client, agent, now, trust=trust_device, shape_link=shape_link
        )
        session = SessionRecord(
            id=new_ulid(now),
            user_id=user.id,
            device_id=device.id,
            created_at=now,
            auth_at=now,
            last_refreshed_at=now,
            absolute_expires_at=now + self._policy.absolute_ttl,
            created_ip=client.ip,
            last_ip=client.ip,
            mfa_at=now if mfa else None,
            last_browser=agent.browser_family,
            last_os=agent.os_family,
        )
        await tx.sessions.insert(session)
        evicted = await self._enforce_cap(tx, user.id, session.id, now)
        issued, _ = await self._issue(tx, user, session, device.id, generation=0, now=now)
        await self._audit.record(
            self._audit.event(
                "session.created", "ok", user_id=user.id, session_id=session.id, device_id=device.id
            ),
            tx,
        )
        return issued, evicted

    async def _enforce_cap(self, tx: Transaction, user_id: str, keep: str, now: datetime) -> list[str]:
        live = [s for s in await tx.sessions.list_live(user_id, now) if s.id != keep]
        evicted: list[str] = []
        overflow = len(live) + 1 - self._policy.max_per_user
        for session in sorted(live, key=lambda s: (s.last_refreshed_at, s.id))[: max(0, overflow)]:
            if await tx.sessions.revoke(session.id, "evicted", now):
                evicted.append(session.id)
        await self._audit.sessions_revoked(tx, user_id, evicted, "evicted")
        return evicted

    async def _issue(
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

    async def after_revocations(self, session_ids: list[str]) -> None:
        """Deny-list markers for sessions revoked in a committed transaction, and the end of their
        pending challenges."""
        if session_ids:
            await self._denylist.revoke_sessions(session_ids)
            if self.sessions_ended is not None:
                await self.sessions_ended(session_ids)

    # refreshing -------------------------------------------------------------------------

    async def refresh(self, client: ClientInfo, raw: str) -> IssuedSession | object:
        """Rotate ``raw`` (behaviour.md 1.5); returns a Session, or what the refresh check answered."""
        if not REFRESH_TOKEN.match(raw):
            raise TokenInvalid()  # never looked up: a stored hash is not a token
        digest = self.token_hash(raw)
        await self._limiter.hit("refresh.token", digest)
        # One key per presented token: first the single-flight lock (_PENDING), then, replacing
        # it, the sealed result of the rotation, kept for the grace window.
        result_key = f"rf:res:{{{digest}}}"
        lock = _PENDING + secrets.token_bytes(12)
        holds_lock = await self._single_flight(result_key, lock)
        answer: object = None
        try:
            for _attempt in range(3):
                answer = await self._refresh_once(client, raw, result_key)
                if answer is not _RETRY:
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

    async def _find_with_context(self, tx: Transaction, raw: str) -> TokenContext | None:
        for _version, digest in self._material.keyed_hashes("refresh", raw):
            found = await tx.sessions.token_with_context(digest)
            if found is not None:
                return found
        return None

    async def _refresh_once(self, client: ClientInfo, raw: str, result_key: str) -> object:
        """Steps 4-9 of behaviour.md 1.5 in one transaction: load, check, rotate, seal, commit."""
        now = self._clock.now()
        ended: str | None = None
        reused = False
        answer: object = None
        try:
            async with self._db.transaction() as tx:
                found = await self._find_with_context(tx, raw)
                if found is None:
                    await self._invalid(client)
                    raise TokenInvalid()
                token, session, user = found.token, found.session, found.user
                if session.revoked_at is not None or token.state == "revoked" or user.status != "active":
                    self._metrics.refreshes.labels("revoked").inc()
                    raise SessionRevoked()
                if session.absolute_expires_at <= now:
                    if await tx.sessions.end(session.id, "expired", now):
                        await self._audit.sessions_revoked(tx, user.id, [session.id], "expired")
                    ended = "absolute"
                elif token.state == "active" and token.expires_at <= now:
                    if await tx.sessions.end(session.id, "idle", now):
                        await self._audit.sessions_revoked(tx, user.id, [session.id], "idle")
                    ended = "idle"
                elif token.state == "rotated":
                    assert token.used_at is not None
                    if now - token.used_at <= self._policy.grace:
                        graced = await self._grace(tx, raw, token, result_key)
                        self._metrics.refreshes.labels("grace").inc()
                        return graced
                    await self._reuse(tx, user, session, token, client, now)
                    reused = True
                else:
                    answer = await self._rotate(tx, client, raw, found, result_key, now)
        except _Rotated:
            return _RETRY  # another request rotated first: look again (it is now a grace case)
        if ended is not None:
            await self.after_revocations([session.id])
            self._metrics.refreshes.labels("expired").inc()
            raise SessionExpired(ended)
        if reused:
            await self.after_revocations([session.id])
            if self.risk_event is not None:
                await self.risk_event("token_reuse", replace(client, device_id=session.device_id))
            self._metrics.refreshes.labels("reuse").inc()
            raise RefreshTokenReused()
        if isinstance(answer, Refusal):
            if answer.ended_session is not None:
                await self.after_revocations([answer.ended_session])
            self._metrics.refreshes.labels("blocked").inc()
            raise answer.error
        await self._failpoints.hit("refresh.after_commit")
        if isinstance(answer, IssuedSession):
            self._metrics.refreshes.labels("rotated").inc()
        return answer

    async def _invalid(self, client: ClientInfo) -> None:
        """An unknown token: count it against the IP (refresh.ip_invalid)."""
        self._metrics.refreshes.labels("invalid").inc()
        if self.risk_event is not None:
            await self.risk_event("invalid_refresh", client)
        await self._limiter.hit("refresh.ip_invalid", ip_key(client.ip))

    async def _grace(self, tx: Transaction, raw: str, token: RefreshToken, result_key: str) -> IssuedSession:
        """A concurrent or retried refresh inside the grace window: the same successor, or TOKEN_INVALID."""
        try:
            sealed = await self._ephemeral.get(result_key)
        except BackendUnavailable:
            sealed = None
        if sealed is None or sealed.startswith(_PENDING) or token.successor_id is None:
            raise TokenInvalid()  # the store lost it, or the rotation never committed: nothing is revoked
        try:
            result = json.loads(open_with_secret(raw.encode(), _GRACE_PURPOSE, sealed))
        except (SealError, ValueError):
            raise TokenInvalid() from None
        successor = await tx.sessions.token(token.successor_id)
        if successor is None or successor.state == "revoked":
            raise TokenInvalid()
        sealed_successor = self._material.keyed_hash(
            "refresh", str(result["refresh_token"]), successor.key_version
        )
        if not constant_time_equal(sealed_successor, successor.token_hash):
            # the sealed pair is from a rotation that rolled back; the committed one's was lost
            raise TokenInvalid()
        return IssuedSession(
            access_token=result["access_token"],
            access_expires_at=datetime.fromisoformat(result["access_expires_at"]),
            refresh_token=result["refresh_token"],
            refresh_expires_at=datetime.fromisoformat(result["refresh_expires_at"]),
            session_id=result["session_id"],
            user_id=result["user_id"],
            device_id=result["device_id"],
        )

    async def _reuse(
        self,
        tx: Transaction,
        user: User,
        session: SessionRecord,
        token: RefreshToken,
        client: ClientInfo,
        now: datetime,
    ) -> None:
        """A replayed token: end the session and its whole chain, distrust the device, hold MFA, alert."""
        await tx.sessions.revoke(session.id, "reuse", now)
        link = await tx.devices.get_link(user.id, session.device_id)
        if link is not None:
            await self._audit.untrust_devices(tx, [link], now, "reuse")
        await tx.users.set_mfa_hold(user.id, now + self._policy.reuse_mfa_hold, now)
        details = {
            "generation": token.generation,
            "rotated_at": token.used_at.isoformat() if token.used_at else None,
        }
        await self._audit.record(
            self._audit.event(
                "refresh.reuse_detected",
                "fail",
                user_id=user.id,
                session_id=session.id,
                device_id=session.device_id,
                details=details,
            ),
            tx,
        )
        await self._audit.record(
            self._audit.event(
                "session.revoked", "info", user_id=user.id, session_id=session.id, details={"reason": "reuse"}
            ),
            tx,
        )
        await self._mailer.queue(
            tx,
            "security_alert",
            user.email,
            params={
                "name": user.name,
                "what": "an old sign-in token was used again, which happens when it has been copied",
                "time_utc": now.strftime("%Y-%m-%d %H:%M"),
            },
            user_id=user.id,
            locale=user.locale,
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
    ) -> object:
        """Step 8: the compare-and-set, the successor and the bookkeeping, inside the caller's transaction."""
        presented, session, user = found.token, found.session, found.user
        agent = self._agents.parse(client.user_agent)
        after: AfterRotation | None = None
        if self.refresh_check is not None:
            answer = await self.refresh_check(
                RefreshContext(client, agent, user, session, presented, found.link), tx
            )
            if isinstance(answer, AfterRotation):
                after = answer
            elif answer is not None:
                return answer
        issued = await self.rotate_in(tx, client, agent, found, now, after)
        # Sealed under the presented token before COMMIT: a retry whose answer got lost gets it back.
        await self._store_result(raw, result_key, issued)
        await self._failpoints.hit("refresh.before_commit")
        return issued

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
        inside ``tx``. Raises ``_Rotated`` when another request rotated first."""
        presented, session, user = found.token, found.session, found.user
        device_id = session.device_id
        if after is not None and after.device_id and after.device_id != device_id:
            device_id = after.device_id
            await tx.sessions.rebind(session.id, device_id)
        issued, successor_id = await self._issue(
            tx,
            user,
            session,
            device_id,
            generation=presented.generation + 1,
            now=now,
            roles=list(found.roles),
        )
        await self._failpoints.hit("refresh.after_insert")
        if not await tx.sessions.mark_rotated(presented.id or 0, successor_id, now):
            raise _Rotated()  # someone else rotated first: roll back, look again (grace)
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
        now = self._clock.now()
        try:
            async with self._db.transaction() as tx:
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
        except _Rotated:
            raise ChallengeExpired() from None
        self._metrics.refreshes.labels("rotated").inc()
        return issued

    async def _store_result(self, raw: str, result_key: str, issued: IssuedSession) -> None:
        payload = json.dumps(
            {
                "access_token": issued.access_token,
                "access_expires_at": issued.access_expires_at.isoformat(),
                "refresh_token": issued.refresh_token,
                "refresh_expires_at": issued.refresh_expires_at.isoformat(),
                "session_id": issued.session_id,
                "user_id": issued.user_id,
                "device_id": issued.device_id,
            }
        ).encode()
        sealed = seal_with_secret(raw.encode(), _GRACE_PURPOSE, payload)
        await self._quietly(
            self._ephemeral.set(result_key, sealed, self._policy.grace + timedelta(seconds=5))
        )

    # ending ---------------------------------------------------------------------------------

    async def logout(self, raw: str) -> None:
        """End the session a refresh token belongs to (active or already rotated). Idempotent."""
        if not REFRESH_TOKEN.match(raw):
            raise InvalidArgument.one("refresh_token", "must be a refresh token (iamr_ and 43 characters)")
        now = self._clock.now()
        async with self._db.transaction() as tx:
            found = await self._find_with_context(tx, raw)
            session = found.session if found else None
            revoked = session is not None and await tx.sessions.revoke(session.id, "logout", now)
            if revoked and session is not None:
                await self._audit.record(
                    self._audit.event(
                        "session.revoked",
                        "ok",
                        user_id=session.user_id,
                        session_id=session.id,
                        device_id=session.device_id,
                        details={"reason": "logout"},
                    ),
                    tx,
                )
        if session is not None and (revoked or session.revoked_at is not None):
            # also when it was already revoked: this may be the retry of a Logout whose replica
            # died between the commit and the deny-list write
            await self.after_revocations([session.id])

    async def revoke_session(self, claims: AccessClaims, session_id: str) -> None:
        """End one of the token owner's sessions; a foreign or unknown id changes nothing."""
        await self._limiter.hit("sessions.user", claims.user_id)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            session = await tx.sessions.get(session_id)
            if session is None or session.user_id != claims.user_id:
                return
            revoked = await tx.sessions.revoke(session.id, "user", now)
            if revoked:
                await self._audit.record(
                    self._audit.event(
                        "session.revoked",
                        "ok",
                        user_id=claims.user_id,
                        session_id=session.id,
                        details={"reason": "user"},
                    ),
                    tx,
                )
        if revoked or session.revoked_at is not None:  # a retry writes the deny-list again
            await self.after_revocations([session_id])

    async def revoke_all(self, claims: AccessClaims, *, keep_current: bool) -> int:
        """The panic button: every live session ends (but the current one, if asked) and every
        other device loses trust."""
        await self._limiter.hit("sessions.user", claims.user_id)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            ids = await tx.sessions.revoke_all(
                claims.user_id, "all", now, keep=claims.session_id if keep_current else None
            )
            await self._audit.untrust_devices(
                tx, await tx.devices.links_of(claims.user_id), now, "all", keep=claims.device_id
            )
            # One event per ended session, each naming it (a single event with a count named the
            # session that asked, which with keep_current is the one that lives on).
            await self._audit.sessions_revoked(tx, claims.user_id, ids, "all")
        await self.after_revocations(ids)
        return len(ids)

    async def list_sessions(self, claims: AccessClaims) -> list[SessionView]:
        await self._limiter.hit("sessions.user", claims.user_id)
        now = self._clock.now()
        async with self._db.transaction(read_only=True) as tx:
            live = await tx.sessions.list_live(claims.user_id, now)
            return [
                SessionView(session, await tx.devices.get(session.device_id), session.id == claims.session_id)
                for session in live
            ]


class _Rotated(Exception):
    """The compare-and-set lost: another request rotated the token first."""


_RETRY = object()
