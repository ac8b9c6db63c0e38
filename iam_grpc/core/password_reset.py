"""Password reset (behaviour.md 2.5).

RequestPasswordReset answers the same, after at least ``reset.response_floor``,
for every syntactically valid address: registered or not, suppressed by the
per-address limit or not, mail limit reached or not. Only the per-IP limiter
(in the interceptors) can refuse it, and it refuses alike for every address.

ResetPassword is single-use through a conditional UPDATE on
``credential_version`` (the link carries the version it was made for), which
holds across replicas and even when the ephemeral store lost the link's used
mark; the same bump voids every other outstanding reset link and pending email
change. Every session ends and no new one is opened: the user signs in again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.core.call import current_call
from iam_grpc.core.client import AgentParser, ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.links import Links
from iam_grpc.core.mail.notices import queue_password_changed
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import PasswordHashing
from iam_grpc.core.ratelimit import pair_key
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import BackendUnavailable, LinkUsed, RateLimited
from iam_grpc.logging import component_logger

__all__ = ["PasswordReset", "ResetPolicy"]

log = component_logger("iam.reset")


@dataclass(frozen=True, slots=True)
class ResetPolicy:
    link_ttl: timedelta  # links.password_reset_ttl
    response_floor: timedelta  # reset.response_floor
    untrust_devices: bool  # reset.untrust_devices


class PasswordReset:
    def __init__(
        self,
        runtime: Runtime,
        material: SecretMaterial,
        rules: PasswordRules,
        hashing: PasswordHashing,
        sessions: Sessions,
        links: Links,
        agents: AgentParser,
        policy: ResetPolicy,
    ) -> None:
        self._run = runtime
        self._material = material
        self._rules = rules
        self._hashing = hashing
        self._sessions = sessions
        self._links = links
        self._agents = agents
        self._link_ttl = policy.link_ttl
        self._floor = policy.response_floor.total_seconds()
        self._untrust = policy.untrust_devices

    # requesting -------------------------------------------------------------------------

    async def request(self, client: ClientInfo, email_text: str, violations: Violations) -> None:
        """Steps 2-5: the same answer and about the same time for every address."""
        call = current_call()
        started = call.started if call is not None else time.monotonic()
        email = check_email(violations, "email", email_text)
        violations.raise_any()
        assert email is not None
        try:
            await self._request(client, email.norm)
        finally:
            # Pad every outcome (sent, unknown, suppressed, failed) to the same floor.
            wait = self._floor - (time.monotonic() - started)
            if wait > 0:
                await asyncio.sleep(wait)

    async def _request(self, client: ClientInfo, email_norm: str) -> None:
        try:
            await self._run.limiter.hit("reset_request.email", email_norm)
        except RateLimited:
            log.info("password reset suppressed by the per-address limit")
            return
        email_h = self._material.keyed_hash("email", email_norm)
        async with self._run.db.transaction() as tx:
            user = await tx.users.get_by_email(email_norm)
            if user is None or user.status != "active":
                await self._run.audit.record(
                    self._run.audit.event(
                        "password.reset_requested", "info", details={"email_h": email_h[:16]}
                    ),
                    tx,
                )
                return
            link = self._links.issue("password_reset", user.id, self._link_ttl, cv=user.credential_version)
            agent = self._agents.parse(client.user_agent)
            try:
                await self._run.mailer.queue(
                    tx,
                    "password_reset",
                    user.email,
                    params={
                        "name": user.name,
                        "minutes_left": int(self._link_ttl.total_seconds() // 60),
                        "device": agent.label,
                        "location": "",
                    },
                    secrets={"link": link.url},
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                    not_after=link.expires_at,
                )
            except RateLimited:
                log.bind(user_id=user.id).info("password reset email over the mail limits; not sent")
            await self._run.audit.record(
                self._run.audit.event(
                    "password.reset_requested", "ok", user_id=user.id, details={"jti": link.jti}
                ),
                tx,
            )

    # resetting ------------------------------------------------------------------------

    async def reset(
        self, client: ClientInfo, link_token: str, new_password: str, violations: Violations
    ) -> None:
        """Steps 1-6 (``reset.ip`` ran in the interceptors)."""
        self._rules.check_shape(violations, "new_password", new_password)
        violations.raise_any()
        claims = self._links.read(link_token)  # bad signature or shape: INVALID_ARGUMENT, nothing counted
        permit = await self._run.limiter.hit("reset.link", claims.jti)
        claims = await self._links.verify(link_token, "password_reset")
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.subject)
        version = claims.extra["cv"]
        if user is None or user.status != "active" or user.credential_version != version:
            raise LinkUsed()
        self._rules.check_new(
            violations, "new_password", new_password, email=user.email_norm, names=[user.name, user.last_name]
        )
        violations.raise_any()
        await self._rules.ensure_not_breached(new_password)  # neither failure consumes the link
        stored = await self._hashing.hash(new_password)

        now = self._run.clock.now()
        async with self._run.db.transaction() as tx:
            changed = await tx.users.set_password(
                user.id,
                stored.phc,
                stored.pepper_id or 0,
                now,
                expect_credential_version=version,
                verify_email=True,
            )
            if not changed:
                raise LinkUsed()  # another reset (or a change) won the race
            ended = await tx.sessions.revoke_all(user.id, "password_reset", now)
            await self._run.audit.sessions_revoked(tx, user.id, ended, "password_reset")
            if self._untrust:
                await self._run.audit.untrust_devices(
                    tx, await tx.devices.links_of(user.id), now, "password_reset"
                )
            await queue_password_changed(
                self._run.mailer,
                tx,
                user,
                ip=client.ip,
                device=self._agents.parse(client.user_agent).label,
                now=now,
                how="reset",
            )
            await self._run.audit.record(
                self._run.audit.event(
                    "password.reset", "ok", user_id=user.id, details={"sessions_ended": len(ended)}
                ),
                tx,
            )
            await self._run.failpoints.hit("reset.before_commit")
        await permit.succeeded()
        await self._sessions.after_revocations(ended)
        await self._links.mark_used(claims)
        for group, key in (
            ("login.account", user.email_norm),
            ("login.pair", pair_key(client.ip, user.email_norm)),
        ):
            try:
                await self._run.limiter.clear(group, key)
            except BackendUnavailable:
                log.bind(group=group).warning("could not clear a login limit after a reset")
        log.bind(user_id=user.id).info("password reset")
