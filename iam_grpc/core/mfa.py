"""Completing MFA (behaviour.md 3.4, 4.2-4.6, 5.4): codes, magic links, resends, step-up grants.

A challenge is completed by its code or its link on the device that raised it,
and only then does anyone receive a Session: a link opened on another device
only *approves* the challenge (4.5), and the original device collects its
Session by repeating its Login or Refresh. Wrong codes spend attempts in the
same atomic step that reads them, so replicas cannot grant more than
``mfa.max_attempts`` tries between them.

Success changes what the service trusts: the device becomes trusted with a new
baseline and learns its network, country and location; a refresh challenge
rotates the token it was raised for (and moves the session to the completing
device for NEW_DEVICE); a login challenge opens the session; a step-up
challenge yields a short-lived single-use grant bound to the session and
action.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.call import current_call
from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SealError, SecretMaterial, open_with_secret, seal_with_secret
from iam_grpc.core.devices import is_trusted
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.links import LinkClaims, Links
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.observation import LearningPolicy, Observation, Observer, proven
from iam_grpc.core.ratelimit import Permit, RateLimiter, ip_key
from iam_grpc.core.risk import POINTS, RiskScores
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import AfterRotation, IssuedSession, SessionManager
from iam_grpc.core.validation import Violations
from iam_grpc.errors import (
    BackendUnavailable,
    ChallengeExpired,
    CodeInvalid,
    InvalidArgument,
    LinkUsed,
    SessionRevoked,
)
from iam_grpc.ids import CHALLENGE_ID, GRANT_TOKEN, new_grant_token
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database, Ephemeral, Transaction
from iam_grpc.storage.records import User, UserDevice

__all__ = ["Grant", "InspectedLink", "MfaFlows", "MfaPolicy", "Outcome"]

log = component_logger("iam.mfa")

_ACTION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")


@dataclass(frozen=True, slots=True)
class MfaPolicy:
    code_length: int = 6
    grant_ttl: timedelta = timedelta(minutes=5)
    step_up_actions: tuple[str, ...] = ()  # empty: any action
    retry_window: timedelta = timedelta(seconds=15)  # refresh.grace: a completed refresh challenge's
    # Session is kept sealed this long for a VerifyChallenge retried after a lost answer


@dataclass(frozen=True, slots=True)
class Grant:
    token: str
    action: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    """What completing a challenge gives its device: a Session or a step-up grant (or, for a link
    redeemed elsewhere, nothing)."""

    session: IssuedSession | None = None
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class InspectedLink:
    purpose: str
    expires_at: datetime | None
    usable: bool


def _grant_key(digest: str) -> str:
    return f"grant:{{{digest}}}"


def _result_key(challenge_id: str) -> str:
    return f"mfa:res:{{{challenge_id}}}"


_RESULT_PURPOSE = b"mfa-retry"


class MfaFlows:
    def __init__(
        self,
        db: Database,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        clock: Clock,
        limiter: RateLimiter,
        challenges: Challenges,
        links: Links,
        sessions: SessionManager,
        access: AccessTokens,
        observer: Observer,
        risk: RiskScores,
        mailer: Mailer,
        audit: AuditTrail,
        *,
        policy: MfaPolicy,
        learning: LearningPolicy,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._failpoints = failpoints or Failpoints()
        self._db = db
        self._ephemeral = ephemeral
        self._material = material
        self._clock = clock
        self._limiter = limiter
        self._challenges = challenges
        self._links = links
        self._sessions = sessions
        self._access = access
        self._observer = observer
        self._risk = risk
        self._mailer = mailer
        self._audit = audit
        self._policy = policy
        self._learning = learning

    # VerifyChallenge ---------------------------------------------------------------------------

    async def verify(
        self, client: ClientInfo, challenge_id: str, code: str, violations: Violations
    ) -> Outcome:
        """behaviour.md 4.2 (``code.ip`` and the ``code.ip_fail`` block ran in the interceptors)."""
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", "must be a challenge id (ch_ and 22 characters)")
        n = self._policy.code_length
        if len(code) != n or not code.isascii() or not code.isdigit():
            violations.add("code", f"must be {n} digits")
        violations.raise_any()
        if client.device_id:
            await self._limiter.ensure_not_blocked("code.device", client.device_id)
        challenge = await self._challenges.get(challenge_id)
        if challenge is not None and challenge.kind == "refresh" and challenge.state == "done":
            return await self._retried(client, challenge, code)
        if challenge is None or not challenge.live(self._clock.now()):
            raise ChallengeExpired()
        permits = await self._reserve_failure(client, challenge)
        seen = self._observer.observe(client)
        if not (
            challenge.comes_from(client.device_id, seen.agent)
            and self._challenges.code_matches(challenge, code)
        ):
            await self._wrong_code(client, challenge)
        challenge = await self._challenges.finish(challenge.id)  # two right codes at once: one wins
        for permit in permits:
            await permit.succeeded()
        outcome = await self._complete(challenge, client, seen)
        if outcome.session is not None and challenge.kind == "refresh":
            await self._keep_result(challenge, code, outcome.session)
        return outcome

    # a lost answer ------------------------------------------------------------------------------

    def _result_secret(self, challenge_id: str, code: str) -> bytes:
        """What the kept Session is sealed under: the code that completed the challenge, keyed with
        the master key, so neither a dump of the store nor the code alone opens it."""
        return self._material.keyed_hash("otp", f"{challenge_id}:{code}:result").encode()

    async def _keep_result(self, challenge: Challenge, code: str, issued: IssuedSession) -> None:
        """A completed refresh challenge rotated its token: if the answer is lost, the presented
        token is spent and its retry after ``refresh.grace`` would be a replay (the session
        revoked, a 7-day MFA hold). Keep the Session sealed for that window, as Refresh does."""
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
        sealed = seal_with_secret(self._result_secret(challenge.id, code), _RESULT_PURPOSE, payload)
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
        if not (
            challenge.comes_from(client.device_id, seen.agent)
            and self._challenges.code_matches(challenge, code)
        ):
            raise ChallengeExpired()
        try:
            result = json.loads(
                open_with_secret(self._result_secret(challenge.id, code), _RESULT_PURPOSE, sealed)
            )
        except (SealError, ValueError):
            raise ChallengeExpired() from None
        issued = IssuedSession(
            access_token=result["access_token"],
            access_expires_at=datetime.fromisoformat(result["access_expires_at"]),
            refresh_token=result["refresh_token"],
            refresh_expires_at=datetime.fromisoformat(result["refresh_expires_at"]),
            session_id=result["session_id"],
            user_id=result["user_id"],
            device_id=result["device_id"],
        )
        async with self._db.transaction(read_only=True) as tx:
            found = await tx.sessions.token_with_context(self._sessions.token_hash(issued.refresh_token))
        if found is None or found.token.state == "revoked" or found.session.revoked_at is not None:
            raise ChallengeExpired()
        for permit in permits:
            await permit.succeeded()
        return Outcome(session=issued)

    async def _reserve_failure(self, client: ClientInfo, challenge: Challenge) -> list[Permit]:
        permits = [
            await self._limiter.hit("code.ip_fail", ip_key(client.ip)),
            await self._limiter.hit("code.user_fail", challenge.user_id),
        ]
        if client.device_id:
            permits.append(await self._limiter.hit("code.device", client.device_id))
        return permits

    async def _wrong_code(self, client: ClientInfo, challenge: Challenge) -> None:
        left = await self._challenges.spend_attempt(challenge.id)
        ip_points, device_points = POINTS["wrong_code"]
        await self._risk.add(
            ip=client.ip, device_id=client.device_id or None, ip_points=ip_points, device_points=device_points
        )
        async with self._db.transaction() as tx:
            await self._audit.record(
                self._audit.event(
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
        now = self._clock.now()
        ended: list[str] = []
        async with self._db.transaction() as tx:
            user = await tx.users.get(challenge.user_id)
            if challenge.kind == "refresh" and challenge.session_id and user is not None:
                if await tx.sessions.revoke(challenge.session_id, "mfa_failed", now):
                    ended.append(challenge.session_id)
                    await self._audit.sessions_revoked(tx, user.id, ended, "mfa_failed")
                await self._mailer.queue(
                    tx,
                    "security_alert",
                    user.email,
                    params={
                        "name": user.name,
                        "what": "a sign-in check was failed too many times, so that session was ended",
                        "time_utc": now.strftime("%Y-%m-%d %H:%M"),
                    },
                    user_id=user.id,
                    locale=user.locale,
                    dedupe_scope=challenge.session_id,
                )
            await self._audit.record(
                self._audit.event(
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

    # completing ------------------------------------------------------------------------------

    async def _complete(self, challenge: Challenge, client: ClientInfo, seen: Observation) -> Outcome:
        """Apply MFA success for a challenge already moved to ``done``."""
        if challenge.kind == "step_up":
            return Outcome(grant=await self._grant(challenge))
        if challenge.kind == "refresh":
            return Outcome(session=await self.complete_refresh(challenge, client, seen))
        return Outcome(session=await self.complete_login(challenge, client, seen))

    async def complete_login(
        self, challenge: Challenge, client: ClientInfo, seen: Observation
    ) -> IssuedSession:
        """A login challenge proven: the session opens on a device that is trusted from now on."""
        now = self._clock.now()
        async with self._db.transaction() as tx:
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
            await tx.users.mark_email_verified(user.id, now)
            await self._success_records(
                tx, user, challenge, issued.session_id, issued.device_id, seen, newly_trusted
            )
            await self._audit.record(
                self._audit.event(
                    "login.success",
                    "ok",
                    user_id=user.id,
                    session_id=issued.session_id,
                    device_id=issued.device_id,
                ),
                tx,
            )
        await self._sessions.after_revocations(evicted)
        return issued

    async def complete_refresh(
        self, challenge: Challenge, client: ClientInfo, seen: Observation
    ) -> IssuedSession:
        """A refresh challenge proven: its token rotates; the session moves to the completing
        device for NEW_DEVICE; the device is trusted with a fresh baseline."""
        assert challenge.token_hash is not None
        device_id = ""
        if challenge.reason == "NEW_DEVICE":
            async with self._db.transaction() as tx:
                device = await self._sessions.resolve_device(tx, client, seen.agent, self._clock.now())
            device_id = device.id
        return await self._sessions.rotate_for_challenge(
            challenge.token_hash, client, seen.agent, self.after_rotation(challenge, client, seen, device_id)
        )

    def after_rotation(
        self, challenge: Challenge, client: ClientInfo, seen: Observation, device_id: str = ""
    ) -> AfterRotation:
        """The 3.4 bookkeeping of a completed refresh challenge, run in the rotation's transaction."""

        async def apply(tx: Transaction, issued: IssuedSession) -> None:
            now = self._clock.now()
            user = await tx.users.get(challenge.user_id)
            if user is None:
                raise ChallengeExpired()
            await tx.sessions.set_auth(issued.session_id, now, mfa=True)
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
        await self._audit.record(
            self._audit.event(
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
            await self._audit.record(
                self._audit.event("device.trusted", "ok", user_id=user.id, device_id=device_id), tx
            )
            await self._mailer.queue(
                tx,
                "new_device",
                user.email,
                params={
                    "name": user.name,
                    "device": seen.agent.label,
                    "location": seen.location,
                    "time_utc": self._clock.now().strftime("%Y-%m-%d %H:%M"),
                },
                user_id=user.id,
                locale=user.locale,
                dedupe_scope=device_id,
            )

    # magic links --------------------------------------------------------------------------------

    async def redeem(
        self, client: ClientInfo, link_token: str, violations: Violations
    ) -> tuple[Outcome, str]:
        """RedeemMagicLink (4.5, 5.4): the challenge's device completes it; another device only
        approves it (an empty result), and a step-up link yields the grant to whoever redeems it."""
        violations.raise_any()
        purpose = self._links.read(link_token).purpose
        if purpose not in ("mfa", "step_up"):
            raise InvalidArgument.one("link_token", "is not a link for this operation")
        claims = await self._links.verify(link_token, "step_up" if purpose == "step_up" else "mfa")
        challenge = await self._challenges.get(str(claims.extra["cid"]))
        now = self._clock.now()
        if challenge is None or claims.jti not in challenge.link_jtis or challenge.user_id != claims.subject:
            raise LinkUsed()
        if not challenge.live(now):
            raise ChallengeExpired() if challenge.expires_at <= now else LinkUsed()
        seen = self._observer.observe(client)
        await self._failpoints.hit("redeem.before_finish")
        if challenge.kind != "step_up" and not challenge.comes_from(client.device_id, seen.agent):
            await self._finish_by_link(challenge.id, approve_only=True)
            await self._links.mark_used(claims)
            async with self._db.transaction() as tx:
                await self._audit.record(
                    self._audit.event(
                        "mfa.approved_elsewhere",
                        "ok",
                        user_id=challenge.user_id,
                        session_id=challenge.session_id,
                        details={"challenge": challenge.id},
                    ),
                    tx,
                )
            return Outcome(), purpose
        challenge = await self._finish_by_link(challenge.id)
        await self._links.mark_used(claims)
        return await self._complete(challenge, client, seen), purpose

    async def _finish_by_link(self, challenge_id: str, *, approve_only: bool = False) -> Challenge:
        """Move the challenge on for a link. Losing the compare-and-set to another redemption of
        the link (or to its code) means the link has done its work: LINK_USED (S38), unless the
        challenge expired in between."""
        try:
            return await self._challenges.finish(challenge_id, approve_only=approve_only)
        except ChallengeExpired:
            current = await self._challenges.get(challenge_id)
            if current is None or current.expires_at <= self._clock.now():
                raise
            raise LinkUsed() from None

    async def inspect(self, link_token: str) -> InspectedLink:
        """InspectMagicLink: never changes anything. A token failing its signature is ``usable =
        False`` with no purpose; a shapeless one is INVALID_ARGUMENT."""
        call = current_call()
        caller = call.caller.id if call is not None and call.caller is not None else "anonymous"
        try:
            claims = self._links.read(link_token)
        except InvalidArgument:
            if not link_token or len(link_token.encode()) > 2048 or link_token.count(".") != 2:
                raise
            await self._limiter.hit("link_inspect.caller_invalid", caller)
            return InspectedLink("", None, False)
        await self._limiter.hit("link_inspect.link", claims.jti)
        return InspectedLink(claims.purpose, claims.expires_at, await self._usable(claims))

    async def _usable(self, claims: LinkClaims) -> bool:
        now = self._clock.now()
        if claims.expires_at <= now or await self._links.is_used(claims.jti):
            return False
        if claims.purpose in ("mfa", "step_up"):
            challenge = await self._challenges.get(str(claims.extra["cid"]))
            return challenge is not None and challenge.live(now) and claims.jti in challenge.link_jtis
        async with self._db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.subject)
        if user is None or user.status != "active" or user.credential_version != claims.extra.get("cv"):
            return False
        if claims.purpose == "email_change":
            return self._material.keyed_hash("email", user.email_norm) == claims.extra.get("oeh")
        return True

    # resends ---------------------------------------------------------------------------------------

    async def resend(self, client: ClientInfo, challenge_id: str, violations: Violations) -> Challenge:
        """ResendChallenge (4.3): from the challenge's device only, spaced and counted (the record's
        own interval and budget, and the ``resend.challenge`` limiter group, 8.3)."""
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", "must be a challenge id (ch_ and 22 characters)")
        violations.raise_any()
        challenge = await self._challenges.get(challenge_id)
        seen = self._observer.observe(client)
        if (
            challenge is None
            or not challenge.live(self._clock.now())
            or not challenge.comes_from(client.device_id, seen.agent)
        ):
            raise ChallengeExpired()
        # Counted only for the challenge's own device: another one could otherwise spend the slot.
        await self._limiter.hit("resend.challenge", challenge.id)
        async with self._db.transaction(read_only=True) as tx:
            user = await tx.users.get(challenge.user_id)
        if user is None:
            raise ChallengeExpired()
        return await self._challenges.resend(
            challenge, user, device_label=seen.agent.label, location=seen.location
        )

    # step-up -----------------------------------------------------------------------------------------

    async def start_step_up(
        self, client: ClientInfo, access_token: str, action: str, violations: Violations
    ) -> Challenge:
        """StartStepUp (4.6): one pending step-up per session; the same action gets it back, another
        action replaces it."""
        if not _ACTION.match(action):
            violations.add("action", "must match ^[a-z0-9][a-z0-9._-]{0,63}$")
        elif (
            self._policy.step_up_actions and action != "reauth" and action not in self._policy.step_up_actions
        ):
            violations.add("action", "is not a configured step-up action")
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        await self._limiter.hit("step_up.session", claims.session_id)
        await self._limiter.hit("step_up.user", claims.user_id)
        # Only the session's step-up: a pending refresh challenge is left alone (4.1).
        pending = await self._challenges.pending_for_session(claims.session_id, "step_up")
        if pending is not None:
            if pending.action == action:
                return pending
            await self._challenges.end(pending)
        async with self._db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.user_id)
        if user is None or user.status != "active":
            raise SessionRevoked()
        seen = self._observer.observe(client)
        return await self._challenges.create(
            "step_up",
            user,
            "STEP_UP",
            asdict(client),
            seen.agent,
            device_label=seen.agent.label,
            location=seen.location,
            session_id=claims.session_id,
            action=action,
        )

    async def _grant(self, challenge: Challenge) -> Grant:
        """256 random bits, stored only under a keyed hash with its user, session and action."""
        now = self._clock.now()
        token = new_grant_token()
        expires = now + self._policy.grant_ttl
        record = json.dumps(
            {
                "user_id": challenge.user_id,
                "session_id": challenge.session_id,
                "action": challenge.action,
                "expires_at": expires.isoformat(),
            }
        ).encode()
        await self._ephemeral.set(
            _grant_key(self._material.keyed_hash("grant", token)), record, self._policy.grant_ttl
        )
        async with self._db.transaction() as tx:
            if challenge.session_id:
                await tx.sessions.set_auth(challenge.session_id, now)
            await self._audit.record(
                self._audit.event(
                    "step_up.granted",
                    "ok",
                    user_id=challenge.user_id,
                    session_id=challenge.session_id,
                    details={"action": challenge.action},
                ),
                tx,
            )
        return Grant(token, challenge.action or "", expires)

    async def consume_grant(self, grant_token: str, action: str) -> tuple[str, str]:
        """ConsumeStepUpGrant: a wrong action leaves the grant alone; otherwise it is used up
        atomically, once."""
        if not _ACTION.match(action):
            raise InvalidArgument.one("action", "must match ^[a-z0-9][a-z0-9._-]{0,63}$")
        call = current_call()
        caller = call.caller.id if call is not None and call.caller is not None else "anonymous"
        if not GRANT_TOKEN.match(grant_token):
            await self._limiter.hit("grant.caller_fail", caller)
            raise ChallengeExpired()
        key = _grant_key(self._material.keyed_hash("grant", grant_token))
        raw = await self._ephemeral.get(key)
        if raw is not None and json.loads(raw)["action"] != action:
            raise InvalidArgument.one("action", "is not the action this grant was given for")
        raw = await self._ephemeral.get_and_delete(key)
        if raw is None:
            await self._limiter.hit("grant.caller_fail", caller)
            raise ChallengeExpired()
        record = json.loads(raw)
        if datetime.fromisoformat(record["expires_at"]) <= self._clock.now():
            raise ChallengeExpired()
        async with self._db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(record["session_id"])
        if session is None or session.revoked_at is not None:
            raise SessionRevoked()
        async with self._db.transaction() as tx:
            await self._audit.record(
                self._audit.event(
                    "step_up.consumed",
                    "ok",
                    user_id=record["user_id"],
                    session_id=record["session_id"],
                    details={"action": action},
                ),
                tx,
            )
        return str(record["user_id"]), str(record["session_id"])
