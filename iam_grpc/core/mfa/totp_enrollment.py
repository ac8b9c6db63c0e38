"""Turning TOTP on and off: EnrollTotp, ConfirmTotp, DisableTotp.

An enrollment is pending in the ephemeral store (``totp:enr:{id}``, the secret sealed) until a code
from the app confirms it; one pending enrollment per user (a newer one replaces it). Confirming
moves the sealed secret to SQL with the code's time-step as ``last_step`` (the confirming code
cannot then pass a challenge) and answers the recovery codes, which exist nowhere else in clear.
Turning TOTP off needs a step-up grant for ``disable-totp`` given to the same session.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.mfa.totp import TOTP_DIGITS, TotpFactors
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.core.validation import Violations
from iam_grpc.errors import (
    BackendUnavailable,
    ChallengeExpired,
    CodeInvalid,
    InvalidArgument,
    ReauthRequired,
    SessionRevoked,
    TotpAlreadyEnabled,
)
from iam_grpc.logging import component_logger
from iam_grpc.storage.factor_ports import TotpFactor
from iam_grpc.storage.ports import Conflict, Ephemeral
from iam_grpc.storage.records import User

__all__ = ["DISABLE_ACTION", "Enrollment", "TotpEnrollment"]

log = component_logger("iam.mfa")

DISABLE_ACTION = "disable-totp"
_ENROLLMENT_ID = re.compile(r"^te_[A-Za-z0-9_-]{22}\Z")
_CAS_TRIES = 16


@dataclass(frozen=True, slots=True)
class Enrollment:
    id: str
    secret_base32: str
    otpauth_uri: str


def _key(enrollment_id: str) -> str:
    return f"totp:enr:{{{enrollment_id}}}"


def _user_key(user_id: str) -> str:
    return f"totp:enr:user:{{{user_id}}}"


class TotpEnrollment:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        access: AccessTokens,
        step_up: StepUp,
        factors: TotpFactors,
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._access = access
        self._step_up = step_up
        self._factors = factors

    async def _active_user(self, claims: AccessClaims, *, fresh: bool = False) -> User:
        """The token's user, active, without TOTP; ``fresh``: signed in (or stepped up) within
        ``mfa.totp_max_auth_age``, so a stolen access token alone cannot bind the account to an
        app the thief holds."""
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.user_id)
            session = await tx.sessions.get(claims.session_id)
            enabled = await self._factors.enabled(claims.user_id, tx)
        if user is None or user.status != "active" or session is None or session.revoked_at is not None:
            raise SessionRevoked()
        if fresh and self._run.clock.now() - session.auth_at > self._factors.policy.max_auth_age:
            raise ReauthRequired()
        if enabled:
            raise TotpAlreadyEnabled()
        return user

    async def enroll(self, client: ClientInfo, access_token: str, violations: Violations) -> Enrollment:
        """EnrollTotp: a new secret, pending until ConfirmTotp; it replaces a pending one."""
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        user = await self._active_user(claims, fresh=True)
        await self._run.limiter.hit("totp.user", user.id)
        secret = self._factors.new_secret()
        enrollment_id = "te_" + secrets.token_urlsafe(16)[:22]
        record = {
            "user_id": user.id,
            "session_id": claims.session_id,
            "secret": base64.b64encode(self._factors.seal(user.id, secret)).decode(),
            "attempts_left": self._factors.policy.enrollment_attempts,
        }
        ttl = self._factors.policy.enrollment_ttl
        await self._ephemeral.set(_key(enrollment_id), json.dumps(record).encode(), ttl)
        await self._ephemeral.set(_user_key(user.id), enrollment_id.encode(), ttl)
        log.bind(user_id=user.id).info("totp enrollment started")
        return Enrollment(enrollment_id, secret, self._factors.provisioning_uri(secret, user.email))

    async def confirm(
        self, client: ClientInfo, access_token: str, enrollment_id: str, code: str, violations: Violations
    ) -> list[str]:
        """ConfirmTotp: a right code turns TOTP on and answers the recovery codes (shown once)."""
        if not _ENROLLMENT_ID.match(enrollment_id):
            violations.add("enrollment_id", "must be an enrollment id from EnrollTotp")
        if len(code) != TOTP_DIGITS or not code.isascii() or not code.isdigit():
            violations.add("code", f"must be {TOTP_DIGITS} digits")
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        user = await self._active_user(claims)
        raw = await self._ephemeral.get(_key(enrollment_id))
        pointer = await self._ephemeral.get(_user_key(user.id))
        if raw is None or pointer != enrollment_id.encode():
            raise ChallengeExpired()
        record = json.loads(raw)
        if record["user_id"] != user.id:
            raise ChallengeExpired()
        sealed = base64.b64decode(record["secret"])
        secret = self._factors.open(user.id, sealed)
        step = self._factors.step_of(secret, code) if secret is not None else None
        if step is None:
            raise CodeInvalid(await self._spend_attempt(enrollment_id))
        if await self._ephemeral.get_and_delete(_key(enrollment_id)) is None:
            raise ChallengeExpired()  # another confirmation of it won
        await self._ephemeral.delete(_user_key(user.id))
        return await self._turn_on(user, claims, sealed, step)

    async def _turn_on(self, user: User, claims: AccessClaims, sealed: bytes, step: int) -> list[str]:
        now = self._run.clock.now()
        codes, hashes = self._factors.new_recovery_codes(user.id)
        audit = self._run.audit
        try:
            async with self._run.db.transaction() as tx:
                if await tx.totp.get(user.id) is not None:
                    raise TotpAlreadyEnabled()
                await tx.totp.enable(TotpFactor(user.id, sealed, now, step))
                await tx.totp.replace_recovery_codes(user.id, hashes, now)
                await audit.record(
                    audit.event("mfa.totp_enabled", "ok", user_id=user.id, session_id=claims.session_id),
                    tx,
                )
        except Conflict:
            raise TotpAlreadyEnabled() from None
        log.bind(user_id=user.id).info("totp enabled")
        return codes

    async def _spend_attempt(self, enrollment_id: str) -> int:
        """A wrong code: one attempt fewer, atomically; the last one ends the enrollment."""
        key = _key(enrollment_id)
        for _ in range(_CAS_TRIES):
            raw = await self._ephemeral.get(key)
            if raw is None:
                raise ChallengeExpired()
            record = json.loads(raw)
            left = int(record["attempts_left"]) - 1
            if left <= 0:
                if await self._ephemeral.delete_if(key, raw):
                    return 0
                continue
            record["attempts_left"] = left
            if await self._ephemeral.compare_and_set(key, raw, json.dumps(record).encode()):
                return left
        raise BackendUnavailable()

    async def disable(
        self, client: ClientInfo, access_token: str, grant_token: str, violations: Violations
    ) -> None:
        """DisableTotp: the grant must be for ``disable-totp`` and this session."""
        if not grant_token:
            violations.add("step_up_grant", f"a step-up grant for {DISABLE_ACTION!r} is required")
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        user_id, session_id = await self._step_up.consume(grant_token, DISABLE_ACTION)
        if user_id != claims.user_id or session_id != claims.session_id:
            raise InvalidArgument.one("step_up_grant", "was given to another session")
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            removed = await tx.totp.disable(claims.user_id)
            if removed:
                await audit.record(
                    audit.event(
                        "mfa.totp_disabled", "ok", user_id=claims.user_id, session_id=claims.session_id
                    ),
                    tx,
                )
        log.bind(user_id=claims.user_id).info("totp disabled")
