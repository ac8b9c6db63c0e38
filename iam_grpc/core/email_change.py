"""Email change (behaviour.md 2.7): proven by the new mailbox, announced to the old one.

A request needs a fresh authentication (``auth_at`` within
``email_change.max_auth_age``), so a stolen access token alone cannot move the
account. Whether the new address is free or taken, the answer is the same
after the same padding: a taken address receives a notice instead of a link,
so the request is no oracle of registered addresses.

The confirmation link carries the keyed hash of the current address and the
credential version; the UPDATE only applies while both still match, which
makes the link single-use and voids it when the password changes (the "not
you? change your password" advice in the notice to the old address).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.call import current_call
from iam_grpc.core.client import AgentParser, ClientInfo
from iam_grpc.core.crypto import SecretMaterial, constant_time_equal
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.links import Links
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.ratelimit import RateLimiter
from iam_grpc.core.signup import EmailDomains
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import SessionManager
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import EmailTaken, InvalidArgument, LinkUsed, RateLimited, ReauthRequired, SessionRevoked
from iam_grpc.logging import component_logger, mask_email
from iam_grpc.storage.ports import Conflict, Database

__all__ = ["EmailChange"]

log = component_logger("iam.email_change")


class EmailChange:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        failpoints: Failpoints,
        material: SecretMaterial,
        limiter: RateLimiter,
        access: AccessTokens,
        domains: EmailDomains,
        sessions: SessionManager,
        links: Links,
        mailer: Mailer,
        agents: AgentParser,
        audit: AuditTrail,
        *,
        link_ttl: timedelta,
        max_auth_age: timedelta,
        response_floor: timedelta,
    ) -> None:
        self._db = db
        self._failpoints = failpoints
        self._clock = clock
        self._material = material
        self._limiter = limiter
        self._access = access
        self._domains = domains
        self._sessions = sessions
        self._links = links
        self._mailer = mailer
        self._agents = agents
        self._audit = audit
        self._link_ttl = link_ttl
        self._max_auth_age = max_auth_age
        self._floor = response_floor.total_seconds()

    def _address_hash(self, email_norm: str) -> str:
        return self._material.keyed_hash("email", email_norm)

    # requesting ------------------------------------------------------------------------

    async def request(
        self, client: ClientInfo, access_token: str, new_email: str, violations: Violations
    ) -> None:
        call = current_call()
        started = call.started if call is not None else time.monotonic()
        address = check_email(violations, "new_email", new_email)  # before storage (2.1)
        violations.raise_any()
        assert address is not None
        claims = await self._access.verify_from_device(access_token, client.device_id)
        await self._limiter.hit("email_change.user", claims.user_id)
        async with self._db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(claims.session_id)
            user = await tx.users.get(claims.user_id)
        if session is None or session.revoked_at is not None or user is None or user.status != "active":
            raise SessionRevoked()
        if self._clock.now() - session.auth_at > self._max_auth_age:
            raise ReauthRequired()
        if address.norm == user.email_norm:
            raise InvalidArgument.one("new_email", "is already the account's address")
        await self._domains.check(address.domain_ascii)

        agent = self._agents.parse(client.user_agent)
        try:
            async with self._db.transaction() as tx:
                holder = await tx.users.get_by_email(address.norm)
                if holder is not None:
                    await self._mailer.queue(
                        tx,
                        "email_in_use",
                        holder.email,
                        params={"name": holder.name},
                        user_id=holder.id,
                        locale=holder.locale,
                        ip=client.ip,
                    )
                    return
                link = self._links.issue(
                    "email_change",
                    user.id,
                    self._link_ttl,
                    cv=user.credential_version,
                    sid=claims.session_id,
                    nem=address.display,
                    oeh=self._address_hash(user.email_norm),
                )
                await self._mailer.queue(
                    tx,
                    "email_change_confirm",
                    address.display,
                    params={"name": user.name, "minutes_left": int(self._link_ttl.total_seconds() // 60)},
                    secrets={"link": link.url},
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                    not_after=link.expires_at,
                )
                await self._mailer.queue(
                    tx,
                    "email_change_requested",
                    user.email,
                    params={
                        "name": user.name,
                        "new_email_masked": mask_email(address.display),
                        "device": agent.label,
                        "location": "",
                    },
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                )
                await self._audit.record(
                    self._audit.event(
                        "email.change_requested",
                        "ok",
                        user_id=user.id,
                        session_id=claims.session_id,
                        details={"jti": link.jti},
                    ),
                    tx,
                )
        except RateLimited:
            # The same answer as a sent link: a mail limit must not tell taken from free addresses.
            log.bind(user_id=user.id).info("email change mail over the mail limits; not sent")
        finally:
            wait = self._floor - (time.monotonic() - started)
            if wait > 0:
                await asyncio.sleep(wait)

    # confirming ------------------------------------------------------------------------

    async def confirm(self, client: ClientInfo, link_token: str, violations: Violations) -> None:
        """``link_redeem.ip`` ran in the interceptors."""
        violations.raise_any()
        claims = await self._links.verify(link_token, "email_change")
        new_display = str(claims.extra["nem"])
        checked = Violations()
        address = check_email(checked, "link_token", new_display)
        if address is None:
            raise LinkUsed()
        now = self._clock.now()
        try:
            async with self._db.transaction() as tx:
                user = await tx.users.get(claims.subject)
                if (
                    user is None
                    or user.status != "active"
                    or user.credential_version != claims.extra["cv"]
                    or not constant_time_equal(self._address_hash(user.email_norm), str(claims.extra["oeh"]))
                ):
                    raise LinkUsed()
                changed = await tx.users.change_email(
                    user.id,
                    address.display,
                    address.norm,
                    now,
                    expect_email_norm=user.email_norm,
                    expect_credential_version=user.credential_version,
                )
                if not changed:
                    raise LinkUsed()
                ended = await tx.sessions.revoke_all(
                    user.id, "email_change", now, keep=str(claims.extra["sid"])
                )
                await self._audit.sessions_revoked(tx, user.id, ended, "email_change")
                await self._mailer.queue(
                    tx,
                    "email_changed",
                    user.email,
                    params={"name": user.name, "new_email_masked": mask_email(address.display)},
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                )
                await self._audit.record(
                    self._audit.event(
                        "email.changed", "ok", user_id=user.id, details={"sessions_ended": len(ended)}
                    ),
                    tx,
                )
                await self._failpoints.hit("email_change.before_commit")
        except Conflict as conflict:
            if conflict.constraint == "users.email_norm":
                raise EmailTaken() from None
            raise
        await self._sessions.after_revocations(ended)
        await self._links.mark_used(claims)
        log.bind(user_id=user.id).info("email changed")
