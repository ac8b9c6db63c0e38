"""What completing a challenge gives (behaviour.md 3.4, 4.2): a session opened or rotated on a
device that is trusted from now on, or a step-up grant. Shared by codes, magic links, a repeated
Login (an approval given elsewhere) and a repeated Refresh (the anomaly checks)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from iam_grpc.core.challenges import Challenge
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.devices import is_trusted
from iam_grpc.core.mail.notices import queue_new_device
from iam_grpc.core.mfa.step_up import Grant, StepUp
from iam_grpc.core.observation import LearningPolicy, Observation, proven
from iam_grpc.core.risk import RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.rotation import AfterRotation, IssuedSession, SessionTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.errors import ChallengeExpired
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User, UserDevice

__all__ = ["ChallengeCompletion", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What completing a challenge gives its device: a Session or a step-up grant (or, for a link
    redeemed elsewhere, nothing)."""

    session: IssuedSession | None = None
    grant: Grant | None = None


class ChallengeCompletion:
    def __init__(
        self,
        runtime: Runtime,
        sessions: Sessions,
        tokens: SessionTokens,
        step_up: StepUp,
        risk: RiskScores,
        learning: LearningPolicy,
    ) -> None:
        self._run = runtime
        self._sessions = sessions
        self._tokens = tokens
        self._step_up = step_up
        self._risk = risk
        self._learning = learning

    async def complete(
        self, challenge: Challenge, client: ClientInfo, seen: Observation, *, mailbox: bool = True
    ) -> Outcome:
        """Apply MFA success for a challenge already moved to ``done``. ``mailbox``: the proof came
        through the email (a code or link), so the address counts as verified; a passkey proves
        the person, not the mailbox."""
        if challenge.kind == "step_up":
            return Outcome(grant=await self._step_up.grant(challenge))
        if challenge.kind == "refresh":
            return Outcome(session=await self.complete_refresh(challenge, client, seen, mailbox=mailbox))
        return Outcome(session=await self.complete_login(challenge, client, seen, mailbox=mailbox))

    async def complete_login(
        self, challenge: Challenge, client: ClientInfo, seen: Observation, *, mailbox: bool = True
    ) -> IssuedSession:
        """A login challenge proven: the session opens on a device that is trusted from now on."""
        now = self._run.clock.now()
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            user = await tx.users.get(challenge.user_id)
            if user is None or user.status != "active":
                raise ChallengeExpired()
            issued, evicted = await self._sessions.open_session(
                tx, user, client, trust_device=False, mfa=True
            )
            newly_trusted = await self._prove_device(
                tx, user, issued.device_id, client, seen, challenge.reason, now
            )
            await tx.users.record_login(user.id, now)
            if mailbox and challenge.proved_by in ("", "email"):  # an app code or passkey proves no mailbox
                await tx.users.mark_email_verified(user.id, now)
            await self._success_records(
                tx, user, challenge, issued.session_id, issued.device_id, seen, newly_trusted
            )
            await audit.record(
                audit.event(
                    "login.success",
                    "ok",
                    user_id=user.id,
                    session_id=issued.session_id,
                    device_id=issued.device_id,
                ),
                tx,
            )
        await self._sessions.after_revocations(evicted, evicted=True)
        return issued

    async def complete_refresh(
        self, challenge: Challenge, client: ClientInfo, seen: Observation, *, mailbox: bool = True
    ) -> IssuedSession:
        """A refresh challenge proven: its token rotates; the session moves to the completing
        device for NEW_DEVICE; the device is trusted with a fresh baseline."""
        assert challenge.token_hash is not None
        device_id = ""
        if challenge.reason == "NEW_DEVICE":
            async with self._run.db.transaction() as tx:
                device = await self._sessions.resolve_device(tx, client, seen.agent, self._run.clock.now())
            device_id = device.id
        return await self._tokens.rotate_for_challenge(
            challenge.token_hash,
            client,
            seen.agent,
            self.after_rotation(challenge, client, seen, device_id, mailbox=mailbox),
        )

    def after_rotation(
        self,
        challenge: Challenge,
        client: ClientInfo,
        seen: Observation,
        device_id: str = "",
        *,
        mailbox: bool = True,
    ) -> AfterRotation:
        """The 3.4 bookkeeping of a completed refresh challenge, run in the rotation's transaction."""

        async def apply(tx: Transaction, issued: IssuedSession) -> None:
            now = self._run.clock.now()
            user = await tx.users.get(challenge.user_id)
            if user is None:
                raise ChallengeExpired()
            await tx.sessions.set_auth(issued.session_id, now, mfa=True)
            if mailbox and challenge.proved_by in ("", "email"):
                await tx.users.mark_email_verified(user.id, now)
            trusted = await self._prove_device(
                tx, user, issued.device_id, client, seen, challenge.reason, now
            )
            await self._success_records(
                tx, user, challenge, issued.session_id, issued.device_id, seen, trusted
            )

        geo = seen.geo
        return AfterRotation(apply, device_id=device_id or None, location=(geo.country, geo.region, geo.city))

    async def _prove_device(
        self,
        tx: Transaction,
        user: User,
        device_id: str,
        client: ClientInfo,
        seen: Observation,
        reason: str,
        now: datetime,
    ) -> bool:
        """Trust the device with the current fingerprint; True when it was not trusted before."""
        link = await tx.devices.get_link(user.id, device_id)
        if link is None:
            link = UserDevice(user_id=user.id, device_id=device_id, first_seen_at=now, last_seen_at=now)
        was_trusted = is_trusted(link, seen.agent, now, self._sessions.trust_idle)
        await tx.devices.save_link(proven(link, seen, client.ip, now, self._learning, reason=reason))
        if reason == "SUSPICIOUS_ACTIVITY":
            await self._risk.reset_device(device_id)
        return not was_trusted

    async def _success_records(
        self,
        tx: Transaction,
        user: User,
        challenge: Challenge,
        session_id: str,
        device_id: str,
        seen: Observation,
        newly_trusted: bool,
    ) -> None:
        audit = self._run.audit
        await audit.record(
            audit.event(
                "mfa.verified",
                "ok",
                user_id=user.id,
                session_id=session_id,
                device_id=device_id,
                details={"reason": challenge.reason, "kind": challenge.kind},
            ),
            tx,
        )
        if newly_trusted:
            await audit.record(audit.event("device.trusted", "ok", user_id=user.id, device_id=device_id), tx)
            await queue_new_device(
                self._run.mailer,
                tx,
                user,
                device=seen.agent.label,
                location=seen.location,
                now=self._run.clock.now(),
                device_id=device_id,
            )
