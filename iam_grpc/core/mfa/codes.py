"""The email code of a challenge (behaviour.md 4.2, 4.3, 3.4): VerifyChallenge and
ResendChallenge.

A code is tried only from the challenge's device; wrong codes spend the challenge's attempts
and count against ``code.ip_fail``, ``code.user_fail`` and ``code.device`` (reserved before
comparing, given back on success). The last failed attempt of a refresh challenge ends its
session. A completed refresh challenge keeps its Session sealed under the code for
``refresh.grace``, so a VerifyChallenge retried after a lost answer gets it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SealError, SecretMaterial, open_with_secret, seal_with_secret
from iam_grpc.core.mail.notices import queue_security_alert
from iam_grpc.core.mfa.completion import ChallengeCompletion, Outcome
from iam_grpc.core.mfa.totp import RECOVERY_CODE_RULE, TOTP_DIGITS, TotpFactors, normalize_recovery_code
from iam_grpc.core.observation import Observer
from iam_grpc.core.ratelimit import Permit, ip_key
from iam_grpc.core.risk import POINTS, RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations
from iam_grpc.errors import BackendUnavailable, ChallengeExpired, CodeInvalid, InvalidArgument
from iam_grpc.ids import CHALLENGE_ID
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Ephemeral

__all__ = ["ChallengeCodes", "CodePolicy"]

log = component_logger("iam.mfa")

_RESULT_PURPOSE = b"mfa-retry"
_CHALLENGE_ID_RULE = "must be a challenge id (ch_ and 22 characters)"


@dataclass(frozen=True, slots=True)
class CodePolicy:
    code_length: int = 6
    retry_window: timedelta = timedelta(seconds=15)  # refresh.grace: a completed refresh challenge's
    # Session is kept sealed this long for a VerifyChallenge retried after a lost answer


def _result_key(challenge_id: str) -> str:
    return f"mfa:res:{{{challenge_id}}}"


class ChallengeCodes:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        challenges: Challenges,
        completion: ChallengeCompletion,
        sessions: Sessions,
        observer: Observer,
        risk: RiskScores,
        policy: CodePolicy,
        factors: TotpFactors | None = None,
    ) -> None:
        self._factors = factors
        self._run = runtime
        self._ephemeral = ephemeral
        self._material = material
        self._challenges = challenges
        self._completion = completion
        self._sessions = sessions
        self._observer = observer
        self._risk = risk
        self._policy = policy

    # VerifyChallenge ---------------------------------------------------------------------------

    async def verify(
        self,
        client: ClientInfo,
        challenge_id: str,
        code: str,
        violations: Violations,
        recovery_code: str = "",
    ) -> Outcome:
        """behaviour.md 4.2 (``code.ip`` and the ``code.ip_fail`` block ran in the interceptors):
        the email code, a TOTP code (same field) or a recovery code, as the challenge's channels
        allow; every kind of wrong answer spends the same attempts."""
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", _CHALLENGE_ID_RULE)
        self._check_proof(code, recovery_code, violations)
        violations.raise_any()
        if client.device_id:
            await self._run.limiter.ensure_not_blocked("code.device", client.device_id)
        challenge = await self._challenges.get(challenge_id)
        answer = code or normalize_recovery_code(recovery_code) or ""  # what a kept result is sealed under
        if challenge is not None and challenge.kind == "refresh" and challenge.state == "done":
            return await self._retried(client, challenge, answer)
        if challenge is None or not challenge.live(self._run.clock.now()):
            raise ChallengeExpired()
        if recovery_code and "totp" not in challenge.channels:
            raise InvalidArgument.one("recovery_code", "is not accepted by this challenge")
        permits = await self._reserve_failure(client, challenge)
        seen = self._observer.observe(client)
        proved_by = None
        if challenge.comes_from(client.device_id, seen.agent):
            proved_by = await self._proof(challenge, code, recovery_code)
        if proved_by is None:
            await self._wrong_code(client, challenge)
        # two right codes at once: one wins
        challenge = await self._challenges.finish(challenge.id, proved_by=proved_by or "email")
        for permit in permits:
            await permit.succeeded()
        outcome = await self._completion.complete(challenge, client, seen)
        if outcome.session is not None and challenge.kind == "refresh":
            await self._keep_result(challenge, answer, outcome.session)
        return outcome

    def _check_proof(self, code: str, recovery_code: str, violations: Violations) -> None:
        if code and recovery_code:
            violations.add("recovery_code", "send either code or recovery_code, not both")
        elif recovery_code:
            if normalize_recovery_code(recovery_code) is None:
                violations.add("recovery_code", RECOVERY_CODE_RULE)
        else:
            n = self._policy.code_length
            lengths = {n, TOTP_DIGITS} if self._factors is not None else {n}
            if len(code) not in lengths or not code.isascii() or not code.isdigit():
                violations.add(
                    "code", f"must be {n} digits" + (f" (or {TOTP_DIGITS}: TOTP)" if n != TOTP_DIGITS else "")
                )

    async def _proof(self, challenge: Challenge, code: str, recovery_code: str) -> str | None:
        """Which channel the answer proves, or None. The email code is compared first (it uses
        nothing up); a TOTP code is accepted once, a recovery code once ever."""
        if recovery_code:
            factors = self._factors
            if factors is not None and await factors.prove_recovery_code(challenge.user_id, recovery_code):
                return "recovery_code"
            return None
        if "email" in challenge.channels and self._challenges.code_matches(challenge, code):
            return "email"
        factors = self._factors
        if (
            "totp" in challenge.channels
            and factors is not None
            and await factors.prove_code(challenge.user_id, code)
        ):
            return "totp"
        return None

    # a lost answer ------------------------------------------------------------------------------

    def _result_secret(self, challenge_id: str, code: str) -> bytes:
        """What the kept Session is sealed under: the code that completed the challenge, keyed with
        the master key, so neither a dump of the store nor the code alone opens it."""
        return self._material.keyed_hash("otp", f"{challenge_id}:{code}:result").encode()

    async def _keep_result(self, challenge: Challenge, code: str, issued: IssuedSession) -> None:
        """A completed refresh challenge rotated its token: if the answer is lost, the presented
        token is spent and its retry after ``refresh.grace`` would be a replay (the session
        revoked, a 7-day MFA hold). Keep the Session sealed for that window, as Refresh does."""
        sealed = seal_with_secret(self._result_secret(challenge.id, code), _RESULT_PURPOSE, issued.to_json())
        try:
            await self._ephemeral.set(_result_key(challenge.id), sealed, self._policy.retry_window)
        except BackendUnavailable:
            log.warning("could not keep a completed challenge's answer for a retry")

    async def _retried(self, client: ClientInfo, challenge: Challenge, code: str) -> Outcome:
        """VerifyChallenge again for a refresh challenge it completed: within the window, from the
        challenge's device with the same code, the same Session (its successor token still
        unrevoked in SQL); anything else is CHALLENGE_EXPIRED, as for any finished challenge. A
        wrong guess counts against the failure limits like a wrong code."""
        try:
            sealed = await self._ephemeral.get(_result_key(challenge.id))
        except BackendUnavailable:
            sealed = None
        if sealed is None:
            raise ChallengeExpired()
        permits = await self._reserve_failure(client, challenge)
        seen = self._observer.observe(client)
        # An app or recovery code cannot be checked again (it is used up): the kept Session opens
        # only under the very answer that completed the challenge, which proves it as well.
        emailed = challenge.proved_by in ("", "email")
        if not (
            challenge.comes_from(client.device_id, seen.agent)
            and (not emailed or self._challenges.code_matches(challenge, code))
        ):
            raise ChallengeExpired()
        try:
            issued = IssuedSession.from_json(
                open_with_secret(self._result_secret(challenge.id, code), _RESULT_PURPOSE, sealed)
            )
        except (SealError, ValueError):
            raise ChallengeExpired() from None
        if not await self._sessions.is_live(issued):
            raise ChallengeExpired()
        for permit in permits:
            await permit.succeeded()
        return Outcome(session=issued)

    # failures -------------------------------------------------------------------------------------

    async def _reserve_failure(self, client: ClientInfo, challenge: Challenge) -> list[Permit]:
        limiter = self._run.limiter
        permits = [
            await limiter.hit("code.ip_fail", ip_key(client.ip)),
            await limiter.hit("code.user_fail", challenge.user_id),
        ]
        if client.device_id:
            permits.append(await limiter.hit("code.device", client.device_id))
        return permits

    async def _wrong_code(self, client: ClientInfo, challenge: Challenge) -> None:
        left = await self._challenges.spend_attempt(challenge.id)
        ip_points, device_points = POINTS["wrong_code"]
        await self._risk.add(
            ip=client.ip, device_id=client.device_id or None, ip_points=ip_points, device_points=device_points
        )
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            await audit.record(
                audit.event(
                    "mfa.failed",
                    "fail",
                    user_id=challenge.user_id,
                    session_id=challenge.session_id,
                    details={"challenge": challenge.id, "attempts_left": left},
                ),
                tx,
            )
        if left <= 0:
            await self._exhausted(challenge)
        raise CodeInvalid(left)

    async def _exhausted(self, challenge: Challenge) -> None:
        """The last attempt failed (3.4): a refresh challenge's session ends, its device gets the
        reuse-level risk points and the account is told; whoever holds the token but not the
        mailbox cannot keep guessing."""
        now = self._run.clock.now()
        audit = self._run.audit
        ended: list[str] = []
        async with self._run.db.transaction() as tx:
            user = await tx.users.get(challenge.user_id)
            if challenge.kind == "refresh" and challenge.session_id and user is not None:
                if await tx.sessions.revoke(challenge.session_id, "mfa_failed", now):
                    ended.append(challenge.session_id)
                    await audit.sessions_revoked(tx, user.id, ended, "mfa_failed")
                await queue_security_alert(
                    self._run.mailer,
                    tx,
                    user,
                    what="a sign-in check was failed too many times, so that session was ended",
                    now=now,
                    dedupe_scope=challenge.session_id,
                )
            await audit.record(
                audit.event(
                    "mfa.exhausted",
                    "fail",
                    user_id=challenge.user_id,
                    session_id=challenge.session_id,
                    details={"challenge": challenge.id, "kind": challenge.kind},
                ),
                tx,
            )
        if ended:
            await self._sessions.after_revocations(ended)
            _, device_points = POINTS["token_reuse"]
            await self._risk.add(device_id=challenge.device_id or None, device_points=device_points)

    # ResendChallenge -----------------------------------------------------------------------------

    async def resend(self, client: ClientInfo, challenge_id: str, violations: Violations) -> Challenge:
        """ResendChallenge (4.3): from the challenge's device only, spaced and counted (the record's
        own interval and budget, and the ``resend.challenge`` limiter group, 8.3)."""
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", _CHALLENGE_ID_RULE)
        violations.raise_any()
        challenge = await self._challenges.get(challenge_id)
        seen = self._observer.observe(client)
        if (
            challenge is None
            or not challenge.live(self._run.clock.now())
            or not challenge.comes_from(client.device_id, seen.agent)
        ):
            raise ChallengeExpired()
        # Counted only for the challenge's own device: another one could otherwise spend the slot.
        await self._run.limiter.hit("resend.challenge", challenge.id)
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(challenge.user_id)
        if user is None:
            raise ChallengeExpired()
        return await self._challenges.resend(
            challenge, user, device_label=seen.agent.label, location=seen.location
        )
