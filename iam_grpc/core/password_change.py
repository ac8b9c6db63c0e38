"""ChangePassword (behaviour.md 2.6): the current password proves the person, not just the token.

Wrong current passwords count against ``change_password.user`` (a reservation
taken before verifying, given back on success), so a stolen access token
cannot be used to guess the password. Success ends every other session of the
user and renews the current one's ``auth_at``.
"""

from __future__ import annotations

from iam_grpc.core.client import AgentParser, ClientInfo
from iam_grpc.core.mail.notices import queue_password_changed
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import PasswordHashing, StoredPassword
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations
from iam_grpc.errors import InvalidCredentials, SessionRevoked
from iam_grpc.logging import component_logger

__all__ = ["PasswordChange"]

log = component_logger("iam.password")


class PasswordChange:
    def __init__(
        self,
        runtime: Runtime,
        access: AccessTokens,
        rules: PasswordRules,
        hashing: PasswordHashing,
        sessions: Sessions,
        agents: AgentParser,
    ) -> None:
        self._run = runtime
        self._access = access
        self._rules = rules
        self._hashing = hashing
        self._sessions = sessions
        self._agents = agents

    async def change(
        self,
        client: ClientInfo,
        access_token: str,
        current_password: str,
        new_password: str,
        violations: Violations,
    ) -> None:
        self._rules.check_presented(violations, "current_password", current_password)
        self._rules.check_shape(violations, "new_password", new_password)
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        permit = await self._run.limiter.hit("change_password.user", claims.user_id)
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.user_id)
        if user is None or user.status != "active":
            raise SessionRevoked()
        stored = StoredPassword(user.password_hash, user.pepper_id or None) if user.password_hash else None
        if not await self._hashing.verify(stored, current_password):
            raise InvalidCredentials()
        await permit.succeeded()

        self._rules.check_new(
            violations, "new_password", new_password, email=user.email_norm, names=[user.name, user.last_name]
        )
        if new_password == current_password:
            violations.add("new_password", "must differ from the current password")
        violations.raise_any()
        await self._rules.ensure_not_breached(new_password)
        fresh = await self._hashing.hash(new_password)

        now = self._run.clock.now()
        async with self._run.db.transaction() as tx:
            changed = await tx.users.set_password(
                user.id,
                fresh.phc,
                fresh.pepper_id or 0,
                now,
                expect_credential_version=user.credential_version,
            )
            if not changed:
                raise InvalidCredentials()  # the password changed meanwhile (a reset, another change)
            ended = await tx.sessions.revoke_all(user.id, "password_change", now, keep=claims.session_id)
            await self._run.audit.sessions_revoked(tx, user.id, ended, "password_change")
            await tx.sessions.set_auth(claims.session_id, now)
            await queue_password_changed(
                self._run.mailer,
                tx,
                user,
                ip=client.ip,
                device=self._agents.parse(client.user_agent).label,
                now=now,
                how="change",
            )
            await self._run.audit.record(
                self._run.audit.event(
                    "password.changed",
                    "ok",
                    user_id=user.id,
                    session_id=claims.session_id,
                    device_id=claims.device_id,
                    details={"sessions_ended": len(ended)},
                ),
                tx,
            )
            await self._run.failpoints.hit("password_change.before_commit")
        await self._sessions.after_revocations(ended)
        log.bind(user_id=user.id).info("password changed")
