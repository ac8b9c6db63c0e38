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
from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.core.call import current_call
from iam_grpc.core.client import AgentParser, ClientInfo
from iam_grpc.core.crypto import SecretMaterial, constant_time_equal
from iam_grpc.core.links import Links
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.signup import EmailDomains
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import EmailTaken, InvalidArgument, LinkUsed, RateLimited, ReauthRequired, SessionRevoked
from iam_grpc.logging import component_logger, mask_email
from iam_grpc.storage.ports import Conflict

__all__ = ["EmailChange", "EmailChangePolicy"]

log = component_logger("iam.email_change")


@dataclass(frozen=True, slots=True)
class EmailChangePolicy:
    link_ttl: timedelta  # links.email_change_ttl
    max_auth_age: timedelta  # email_change.max_auth_age
    response_floor: timedelta  # reset.response_floor


class EmailChange:
    def __init__(
        self,
        runtime: Runtime,
        material: SecretMaterial,
        access: AccessTokens,
        domains: EmailDomains,
        sessions: Sessions,
        links: Links,
        agents: AgentParser,
        policy: EmailChangePolicy,
    ) -> None:
        self._run = runtime
        self._material = material
        self._access = access
        self._domains = domains
        self._sessions = sessions
        self._links = links
        self._agents = agents
        self._link_ttl = policy.link_ttl
        self._max_auth_age = policy.max_auth_age
        self._floor = policy.response_floor.total_seconds()

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
        await self._run.limiter.hit("email_change.user", claims.user_id)
        async with self._run.db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(claims.session_id)
            user = await tx.users.get(claims.user_id)
        if session is None or session.revoked_at is not None or user is None or user.status != "active":
            raise SessionRevoked()
        if self._run.clock.now() - session.auth_at > self._max_auth_age:
            raise ReauthRequired()
        if address.norm == user.email_norm:
            raise InvalidArgument.one("new_email", "is already the account's address")
        await self._domains.check(address.domain_ascii)

        agent = self._agents.parse(client.user_agent)
        try:
            async with self._run.db.transaction() as tx:
                holder = await tx.users.get_by_email(address.norm)
                if holder is not None:
                    await self._run.mailer.queue(
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
                await self._run.mailer.queue(
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
                await self._run.mailer.queue(
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
                await self._run.audit.record(
                    self._run.audit.event(
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
        now = self._run.clock.now()
        try:
            async with self._run.db.transaction() as tx:
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
                await self._run.audit.sessions_revoked(tx, user.id, ended, "email_change")
                await self._run.mailer.queue(
                    tx,
                    "email_changed",
                    user.email,
                    params={"name": user.name, "new_email_masked": mask_email(address.display)},
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                )
                await self._run.audit.record(
                    self._run.audit.event(
                        "email.changed", "ok", user_id=user.id, details={"sessions_ended": len(ended)}
                    ),
                    tx,
                )
                await self._run.failpoints.hit("email_change.before_commit")
        except Conflict as conflict:
            if conflict.constraint == "users.email_norm":
                raise EmailTaken() from None
            raise
        await self._sessions.after_revocations(ended)
        await self._links.mark_used(claims)
        log.bind(user_id=user.id).info("email changed")
