"""Sessions (behaviour.md 1.5-1.7): opening one, the device it runs on, revoking and listing.

A session is one sign-in of one user on one device. Opening it resolves the client's device,
links it to the user (trusted when the caller proved the person), enforces
``sessions.max_per_user`` by evicting the sessions refreshed longest ago, and mints the first
token pair (:class:`~iam_grpc.core.tokens.rotation.SessionTokens`). Every revocation commits in
SQL first; :meth:`Sessions.after_revocations` then writes the deny-list entries and ends the
revoked sessions' pending challenges. Refresh lives in ``iam_grpc.core.tokens.refresh``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from iam_grpc.core.client import AgentParser, ClientInfo, ParsedAgent
from iam_grpc.core.devices import baseline_of, is_trusted
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessClaims
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.tokens.rotation import IssuedSession, SessionPolicy, SessionTokens
from iam_grpc.errors import InvalidArgument
from iam_grpc.ids import DEVICE_ID, REFRESH_TOKEN, new_device_id, new_ulid
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import Device, SessionRecord, User, UserDevice

__all__ = ["SessionView", "Sessions", "SessionsEnded"]


@dataclass(frozen=True, slots=True)
class SessionView:
    session: SessionRecord
    device: Device | None
    current: bool


class SessionsEnded(Protocol):
    """Called after sessions were revoked (committed): ends their pending challenges
    (behaviour.md 1.6); see ``iam_grpc.core.challenges.end_session_challenges``."""

    async def __call__(self, session_ids: Sequence[str]) -> None: ...


class Sessions:
    def __init__(
        self,
        runtime: Runtime,
        tokens: SessionTokens,
        agents: AgentParser,
        denylist: DenyList,
        ended: SessionsEnded,
        policy: SessionPolicy,
    ) -> None:
        self._run = runtime
        self._tokens = tokens
        self._agents = agents
        self._denylist = denylist
        self._ended = ended
        self._policy = policy

    @property
    def trust_idle(self) -> timedelta:
        return self._policy.trust_idle

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
            audit = self._run.audit
            await audit.record(
                audit.event(
                    "device.trusted", "ok", user_id=user_id, device_id=device.id, details={"by": "password"}
                ),
                tx,
            )
        if shape_link is not None:
            link = shape_link(link)
        await tx.devices.save_link(link)
        return link

    # opening ---------------------------------------------------------------------------

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
        now = self._run.clock.now()
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
        issued, _ = await self._tokens.issue(tx, user, session, device.id, generation=0, now=now)
        audit = self._run.audit
        await audit.record(
            audit.event("session.created", "ok", user_id=user.id, session_id=session.id, device_id=device.id),
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
        await self._run.audit.sessions_revoked(tx, user_id, evicted, "evicted")
        return evicted

    # ending ----------------------------------------------------------------------------

    async def after_revocations(self, session_ids: list[str], *, evicted: bool = False) -> None:
        """Deny-list markers for sessions revoked in a committed transaction, and the end of their
        pending challenges. ``evicted``: sessions a new sign-in pushed out (the caller does not
        wait until every worker refuses them; they do within the deny-list's staleness bound)."""
        if session_ids:
            await self._denylist.revoke_sessions(session_ids, wait=not evicted)
            await self._ended(session_ids)

    async def logout(self, raw: str) -> None:
        """End the session a refresh token belongs to (active or already rotated). Idempotent."""
        if not REFRESH_TOKEN.match(raw):
            raise InvalidArgument.one("refresh_token", "must be a refresh token (iamr_ and 43 characters)")
        now = self._run.clock.now()
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            found = await self._tokens.find(tx, raw)
            session = found.session if found else None
            revoked = session is not None and await tx.sessions.revoke(session.id, "logout", now)
            if revoked and session is not None:
                await audit.record(
                    audit.event(
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
        await self._run.limiter.hit("sessions.user", claims.user_id)
        now = self._run.clock.now()
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            session = await tx.sessions.get(session_id)
            if session is None or session.user_id != claims.user_id:
                return
            revoked = await tx.sessions.revoke(session.id, "user", now)
            if revoked:
                await audit.record(
                    audit.event(
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
        await self._run.limiter.hit("sessions.user", claims.user_id)
        now = self._run.clock.now()
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            ids = await tx.sessions.revoke_all(
                claims.user_id, "all", now, keep=claims.session_id if keep_current else None
            )
            await audit.untrust_devices(
                tx, await tx.devices.links_of(claims.user_id), now, "all", keep=claims.device_id
            )
            # One event per ended session, each naming it (a single event with a count named the
            # session that asked, which with keep_current is the one that lives on).
            await audit.sessions_revoked(tx, claims.user_id, ids, "all")
        await self.after_revocations(ids)
        return len(ids)

    # listing ---------------------------------------------------------------------------

    async def is_live(self, issued: IssuedSession) -> bool:
        """Whether the refresh token of ``issued`` and its session are unrevoked."""
        async with self._run.db.transaction(read_only=True) as tx:
            found = await tx.sessions.token_with_context(self._tokens.token_hash(issued.refresh_token))
        return not (found is None or found.token.state == "revoked" or found.session.revoked_at is not None)

    async def list_sessions(self, claims: AccessClaims) -> list[SessionView]:
        await self._run.limiter.hit("sessions.user", claims.user_id)
        now = self._run.clock.now()
        async with self._run.db.transaction(read_only=True) as tx:
            live = await tx.sessions.list_live(claims.user_id, now)
            return [
                SessionView(session, await tx.devices.get(session.device_id), session.id == claims.session_id)
                for session in live
            ]
