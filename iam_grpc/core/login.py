"""Login (behaviour.md 2.4).

An unknown email, a disabled account, a guarded account and a wrong password
look the same from outside: each takes the same failure reservations, does
one user lookup and one argon2 verification (against a dummy hash when there
is no real one), writes one audit row, and answers INVALID_CREDENTIALS with
the same message. Failure limits reserve a point *before* verifying, so
parallel guesses cannot overshoot them, and give it back on success, so
successful logins never count toward a lockout.

``login.account`` (per email) does not refuse: when it is over its limit the
account is *guarded*, which only matters for a correct password from a device
not trusted for that user (then the answer is still INVALID_CREDENTIALS). A
victim's own trusted devices are never locked out by someone else's guesses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.devices import ever_trusted, is_trusted
from iam_grpc.core.fingerprint import travel_is_impossible
from iam_grpc.core.mail.notices import queue_new_device
from iam_grpc.core.mfa.completion import ChallengeCompletion
from iam_grpc.core.observation import LearningPolicy, Observation, Observer, learned
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import PasswordHashing, StoredPassword
from iam_grpc.core.ratelimit import Permit, ip_key, pair_key
from iam_grpc.core.risk import POINTS, RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import BackendUnavailable, DeadlineExceeded, InvalidCredentials, RateLimited
from iam_grpc.ids import DEVICE_ID
from iam_grpc.logging import component_logger
from iam_grpc.storage.records import User, UserDevice

__all__ = ["LoginFlow", "LoginPolicy", "LoginResult"]

log = component_logger("iam.login")


@dataclass(frozen=True, slots=True)
class LoginResult:
    session: IssuedSession | None
    challenge: Challenge | None
    password_breached: bool


@dataclass(frozen=True, slots=True)
class _Reservations:
    pair: Permit
    ip_fail: Permit
    account: Permit | None  # None: the account is guarded (over login.account), nothing reserved

    async def succeeded(self) -> None:
        for permit in (self.pair, self.ip_fail, self.account):
            if permit is not None:
                await permit.succeeded()

    async def refund(self) -> None:
        """No verdict was reached (our hashing pool full, the deadline too close, a store down):
        the attempt is nobody's failure. Best effort; a store that is down cannot take them back."""
        try:
            for permit in (self.pair, self.ip_fail, self.account):
                if permit is not None:
                    await permit.refund()
        except BackendUnavailable:
            log.warning("could not give back login failure reservations")


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    mfa_on_new_device: bool  # login.mfa_on_new_device
    risk_threshold: int  # anomaly.risk_threshold
    travel_min_km: float  # anomaly.travel_min_km
    travel_max_kmh: float  # anomaly.travel_max_kmh
    learning: LearningPolicy
    require_verified_email: bool = False  # email_verification.required


class LoginFlow:
    def __init__(
        self,
        runtime: Runtime,
        rules: PasswordRules,
        hashing: PasswordHashing,
        sessions: Sessions,
        challenges: Challenges,
        completion: ChallengeCompletion,
        observer: Observer,
        risk: RiskScores,
        policy: LoginPolicy,
    ) -> None:
        self._run = runtime
        self._rules = rules
        self._hashing = hashing
        self._sessions = sessions
        self._challenges = challenges
        self._completion = completion
        self._observer = observer
        self._risk = risk
        self._policy = policy

    async def login(
        self, client: ClientInfo, email_text: str, password: str, violations: Violations
    ) -> LoginResult:
        """Steps 2-11 (the caller check, ``login.ip`` and the ``login.ip_fail`` block ran in the
        interceptors)."""
        email = check_email(violations, "email", email_text)
        self._rules.check_presented(violations, "password", password)
        violations.raise_any()
        assert email is not None

        reserved = await self._reserve(client.ip, email.norm)
        # Up to the verdict every outcome does the same work in the same order (2.4): one read of
        # the account and its device links (of no one, for an unknown address), the observation of
        # the client, one argon2 verification. A right password on a guarded account must not
        # take longer to refuse than a wrong one, nor an unknown address answer sooner.
        try:
            async with self._run.db.transaction(read_only=True) as tx:
                user = await tx.users.get_by_email(email.norm)
                links = await tx.devices.links_of(user.id if user is not None else "")
            seen = self._observer.observe(client)
            verified = await self._verify(user, password)
        except (RateLimited, DeadlineExceeded, BackendUnavailable):
            # our load or our stores, never the user's failure: no password was judged
            await reserved.refund()
            raise
        now = self._run.clock.now()
        trusted = is_trusted(_link_for(links, client.device_id), seen.agent, now, self._sessions.trust_idle)
        if not verified or user is None:
            await self._fail(client, user, "login.failure")
        if reserved.account is None and not trusted:
            await self._fail(client, user, "login.guarded")

        await reserved.succeeded()
        await self._rehash_if_needed(user, password)
        breached = await self._rules.is_breached(password)

        return await self._answer(user, client, seen, trusted=trusted, links=links, breached=breached)

    async def proven(self, user: User, client: ClientInfo, *, second_factor: bool) -> LoginResult:
        """Steps 8-10 for a user proven another way: a passkey (``second_factor``: it was
        possession and user verification at once, so it stands for the NEW_DEVICE challenge and
        trusts the device) or another provider's ID token (one factor: MFA as for a password).
        The other reasons (a security hold, a risky ip or device, impossible travel) still ask
        for a challenge."""
        if user.status != "active":
            raise InvalidCredentials()
        async with self._run.db.transaction(read_only=True) as tx:
            links = await tx.devices.links_of(user.id)
        seen = self._observer.observe(client)
        now = self._run.clock.now()
        trusted = is_trusted(_link_for(links, client.device_id), seen.agent, now, self._sessions.trust_idle)
        return await self._answer(
            user, client, seen, trusted=trusted or second_factor, links=links, breached=False
        )

    async def _answer(
        self,
        user: User,
        client: ClientInfo,
        seen: Observation,
        *,
        trusted: bool,
        links: list[UserDevice],
        breached: bool,
    ) -> LoginResult:
        """Steps 9-10: a challenge (or the approved one completed), else a session."""
        reason = await self._mfa_reason(user, client, seen, trusted, links)
        if reason is not None:
            try:
                pending = await self._challenges.pending_login(user.id, client.device_id, seen.agent)
            except BackendUnavailable:
                # Nothing pending as far as can be known; the new challenge below needs the store
                # too, so this Login answers BACKEND_UNAVAILABLE (challenges never fall back).
                self._run.metrics.store_fallbacks.labels("pending_login").inc()
                log.warning("pending login challenge unreadable")
                pending = None
            if pending is not None and pending.state == "approved":
                # approved from another device (4.5): this repeated login completes it
                done = await self._challenges.finish(pending.id)
                session = await self._completion.complete_login(done, client, seen)
                self._run.metrics.logins.labels("session").inc()
                return LoginResult(session, None, breached)
            challenge = pending or await self._challenge(user, client, seen, reason)
            self._run.metrics.logins.labels("mfa").inc()
            return LoginResult(None, challenge, breached)
        session = await self._open(user, client, seen, trust=trusted or not ever_trusted(links), links=links)
        self._run.metrics.logins.labels("session").inc()
        return LoginResult(session, None, breached)

    async def _reserve(self, ip: str, email_norm: str) -> _Reservations:
        """Step 3: burst and failure reservations; the account group only notes a guard."""
        pair = await self._run.limiter.hit("login.pair", pair_key(ip, email_norm))
        try:
            ip_fail = await self._run.limiter.hit("login.ip_fail", ip_key(ip))
        except RateLimited:
            await pair.refund()  # refused before any attempt: the pair's failure point goes back
            raise
        account: Permit | None
        try:
            await self._run.limiter.ensure_not_blocked("login.account", email_norm)
        except RateLimited:
            account = None  # guarded: never an answer of its own (no lockout, no oracle)
        else:
            try:
                account = await self._run.limiter.hit("login.account", email_norm)
            except RateLimited:
                # The guard begins (15 min, doubling per repeat, at most 1 h). Its window is left
                # one point short of full, so the guard ends with its block: the next attempt
                # passes (the owner's, refunded on success), and one more failure renews the
                # guard, doubled. Neither the owner's attempts on a window still full from the
                # abuse (S10) nor a fresh allowance of guesses for the attacker.
                await self._run.limiter.leave_one("login.account", email_norm)
                account = None
        return _Reservations(pair, ip_fail, account)

    async def _verify(self, user: User | None, password: str) -> bool:
        """One argon2 verification whatever the account's state: against the dummy hash when there
        is no usable hash; a disabled account is verified and then fails."""
        stored = (
            StoredPassword(user.password_hash, user.pepper_id or None)
            if user is not None and user.password_hash
            else None
        )
        matched = await self._hashing.verify(stored, password)
        self._run.metrics.password_verifications.inc()
        return matched and user is not None and user.status == "active"

    async def _fail(self, client: ClientInfo, user: User | None, kind: str) -> NoReturn:
        """Keep the reservations, record the attempt, answer like a wrong password."""
        self._run.metrics.logins.labels("guarded" if kind == "login.guarded" else "failure").inc()
        ip_points, device_points = POINTS["failed_login"]
        await self._risk.add(
            ip=client.ip, device_id=client.device_id or None, ip_points=ip_points, device_points=device_points
        )
        async with self._run.db.transaction() as tx:
            await self._run.audit.record(
                self._run.audit.event(kind, "fail", user_id=user.id if user else None, ip=client.ip), tx
            )
        raise InvalidCredentials()

    async def _rehash_if_needed(self, user: User, password: str) -> None:
        assert user.password_hash is not None
        if not self._hashing.needs_rehash(StoredPassword(user.password_hash, user.pepper_id or None)):
            return
        await self._run.failpoints.hit("login.before_rehash")
        # Best effort: the password was right, so a busy hashing pool, a short deadline or a failed
        # write must not fail the login; the next login tries again.
        try:
            stored = await self._hashing.hash(password)
            async with self._run.db.transaction() as tx:
                # Only over the credentials that were verified: a reset or change committed since
                # must never be undone by writing the old password back.
                rewritten = await tx.users.set_password(
                    user.id,
                    stored.phc,
                    stored.pepper_id or 0,
                    self._run.clock.now(),
                    expect_credential_version=user.credential_version,
                    bump_version=False,
                )
        except (RateLimited, DeadlineExceeded, BackendUnavailable):
            log.bind(user_id=user.id).warning("password rehash skipped; the next login retries")
            return
        if not rewritten:
            log.bind(user_id=user.id).info("password rehash dropped: the credentials changed meanwhile")

    async def _mfa_reason(
        self, user: User, client: ClientInfo, seen: Observation, trusted: bool, links: list[UserDevice]
    ) -> str | None:
        """Step 9: the first matching reason, or None for a session without MFA."""
        now = self._run.clock.now()
        if self._policy.require_verified_email and user.email_verified_at is None:
            return "EMAIL_UNVERIFIED"  # the email challenge proves the address first
        if user.mfa_hold_until is not None and user.mfa_hold_until > now:
            return "SECURITY_HOLD"
        if self._policy.mfa_on_new_device and not trusted and ever_trusted(links):
            return "NEW_DEVICE"
        score = await self._risk.score(ip=client.ip, device_id=client.device_id or None)
        if score is None:
            self._run.metrics.store_fallbacks.labels("risk_score").inc()  # skipped, as on Refresh
        elif score >= self._policy.risk_threshold:
            return "SUSPICIOUS_ACTIVITY"
        if self._travelled_too_fast(links, seen, now):
            return "IMPOSSIBLE_TRAVEL"
        return None

    def _travelled_too_fast(self, links: list[UserDevice], seen: Observation, now: datetime) -> bool:
        """6.5 for Login: against the user's most recent located activity on any device in 24 h."""
        current = seen.geo.point
        located = [
            link
            for link in links
            if link.last_located_at is not None
            and link.last_lat is not None
            and link.last_lon is not None
            and now - link.last_located_at <= timedelta(hours=24)
        ]
        if current is None or not located or seen.geo.flagged_class is not None:
            return False
        latest = max(located, key=lambda link: link.last_located_at or now)
        assert latest.last_lat is not None
        assert latest.last_lon is not None
        assert latest.last_located_at is not None
        return travel_is_impossible(
            (latest.last_lat, latest.last_lon, latest.last_accuracy_km),
            latest.last_located_at,
            current,
            now,
            min_km=self._policy.travel_min_km,
            max_kmh=self._policy.travel_max_kmh,
        )

    async def _challenge(self, user: User, client: ClientInfo, seen: Observation, reason: str) -> Challenge:
        await self._run.limiter.ensure_not_blocked("code.user_fail", user.id)
        challenge = await self._challenges.create(
            "login",
            user,
            reason,
            asdict(client),
            seen.agent,
            device_label=seen.agent.label,
            location=seen.location,
        )
        self._run.metrics.challenges.labels(reason).inc()
        async with self._run.db.transaction() as tx:
            await self._run.audit.record(
                self._run.audit.event(
                    "login.mfa_required",
                    "info",
                    user_id=user.id,
                    details={"reason": reason, "challenge": challenge.id},
                ),
                tx,
            )
        return challenge

    async def _open(
        self, user: User, client: ClientInfo, seen: Observation, *, trust: bool, links: list[UserDevice]
    ) -> IssuedSession:
        """Step 10: the session, in one transaction with the bookkeeping and the audit row. A
        trusted device learns this network, country and place (6.4)."""
        now = self._run.clock.now()
        notice = not trust and ever_trusted(links)  # only when the new-device rule is switched off

        def learn(link: UserDevice) -> UserDevice:
            return learned(link, seen, client.ip, now, self._policy.learning) if trust else link

        async with self._run.db.transaction() as tx:
            issued, evicted = await self._sessions.open_session(
                tx, user, client, trust_device=trust, shape_link=learn
            )
            await tx.users.record_login(user.id, now)
            await self._run.audit.record(
                self._run.audit.event(
                    "login.success",
                    "ok",
                    user_id=user.id,
                    session_id=issued.session_id,
                    device_id=issued.device_id,
                ),
                tx,
            )
            if notice:
                await queue_new_device(
                    self._run.mailer,
                    tx,
                    user,
                    device=seen.agent.label,
                    location=seen.location,
                    now=now,
                    device_id=issued.device_id,
                    ip=client.ip,
                )
            await self._run.failpoints.hit("login.before_commit")
        await self._sessions.after_revocations(evicted, evicted=True)
        log.bind(user_id=user.id).info("logged in")
        return issued


def _link_for(links: list[UserDevice], device_id: str) -> UserDevice | None:
    if not DEVICE_ID.match(device_id):
        return None
    return next((link for link in links if link.device_id == device_id), None)
