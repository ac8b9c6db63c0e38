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

from dataclasses import dataclass
from typing import NoReturn

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.devices import ever_trusted, is_trusted
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import PasswordHashing, StoredPassword
from iam_grpc.core.ratelimit import Permit, RateLimiter, ip_key, pair_key
from iam_grpc.core.tokens.sessions import ClientInfo, IssuedSession, SessionManager
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import InvalidCredentials, RateLimited
from iam_grpc.ids import DEVICE_ID
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.storage.ports import Database
from iam_grpc.storage.records import User, UserDevice
from iam_grpc.ua import ParsedAgent, UserAgentParser

__all__ = ["LoginFlow", "LoginResult"]

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


class LoginFlow:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        limiter: RateLimiter,
        rules: PasswordRules,
        hashing: PasswordHashing,
        sessions: SessionManager,
        challenges: Challenges,
        mailer: Mailer,
        agents: UserAgentParser,
        audit: AuditTrail,
        metrics: Metrics,
        *,
        mfa_on_new_device: bool,
    ) -> None:
        self._metrics = metrics
        self._db = db
        self._clock = clock
        self._limiter = limiter
        self._rules = rules
        self._hashing = hashing
        self._sessions = sessions
        self._challenges = challenges
        self._mailer = mailer
        self._agents = agents
        self._audit = audit
        self._mfa_on_new_device = mfa_on_new_device

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
        async with self._db.transaction(read_only=True) as tx:
            user = await tx.users.get_by_email(email.norm)
        if not await self._verify(user, password) or user is None:
            await self._fail(client, user, "login.failure")
        assert user is not None

        agent = self._agents.parse(client.user_agent)
        now = self._clock.now()
        async with self._db.transaction(read_only=True) as tx:
            links = await tx.devices.links_of(user.id)
        link = _link_for(links, client.device_id)
        trusted = is_trusted(link, agent, now, self._sessions.trust_idle)
        if reserved.account is None and not trusted:
            await self._fail(client, user, "login.guarded")

        await reserved.succeeded()
        await self._rehash_if_needed(user, password)
        breached = await self._rules.is_breached(password)

        reason = self._mfa_reason(user, trusted, ever_trusted(links))
        if reason is not None:
            challenge = await self._challenge(user, client, agent, reason)
            self._metrics.logins.labels("mfa").inc()
            return LoginResult(None, challenge, breached)
        session = await self._open(user, client, agent, trust=trusted or not ever_trusted(links), links=links)
        self._metrics.logins.labels("session").inc()
        return LoginResult(session, None, breached)

    async def _reserve(self, ip: str, email_norm: str) -> _Reservations:
        """Step 3: burst and failure reservations; the account group only notes a guard."""
        pair = await self._limiter.hit("login.pair", pair_key(ip, email_norm))
        ip_fail = await self._limiter.hit("login.ip_fail", ip_key(ip))
        account: Permit | None
        try:
            await self._limiter.ensure_not_blocked("login.account", email_norm)
            account = await self._limiter.hit("login.account", email_norm)
        except RateLimited:
            account = None  # guarded: never an answer of its own (no lockout, no oracle)
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
        self._metrics.password_verifications.inc()
        return matched and user is not None and user.status == "active"

    async def _fail(self, client: ClientInfo, user: User | None, kind: str) -> NoReturn:
        """Keep the reservations, record the attempt, answer like a wrong password."""
        self._metrics.logins.labels("guarded" if kind == "login.guarded" else "failure").inc()
        async with self._db.transaction() as tx:
            await self._audit.record(
                self._audit.event(kind, "fail", user_id=user.id if user else None, ip=client.ip), tx
            )
        raise InvalidCredentials()

    async def _rehash_if_needed(self, user: User, password: str) -> None:
        assert user.password_hash is not None
        if not self._hashing.needs_rehash(StoredPassword(user.password_hash, user.pepper_id or None)):
            return
        stored = await self._hashing.hash(password)
        async with self._db.transaction() as tx:
            await tx.users.set_password(
                user.id, stored.phc, stored.pepper_id or 0, self._clock.now(), bump_version=False
            )

    def _mfa_reason(self, user: User, trusted: bool, had_trusted: bool) -> str | None:
        """Step 9, the first matching reason (risk score and travel arrive with the anomaly checks)."""
        if user.mfa_hold_until is not None and user.mfa_hold_until > self._clock.now():
            return "SECURITY_HOLD"
        if self._mfa_on_new_device and not trusted and had_trusted:
            return "NEW_DEVICE"
        return None

    async def _challenge(self, user: User, client: ClientInfo, agent: ParsedAgent, reason: str) -> Challenge:
        pending = await self._challenges.pending_login(user.id, client.device_id, agent)
        if pending is not None:
            return pending  # the same challenge, no new email
        challenge = await self._challenges.create_login(
            user,
            reason,
            {
                "ip": client.ip,
                "user_agent": client.user_agent,
                "device_id": client.device_id,
                "accept_language": client.accept_language,
            },
            agent,
            device_label=agent.label,
            location="",
        )
        async with self._db.transaction() as tx:
            await self._audit.record(
                self._audit.event(
                    "login.mfa_required",
                    "info",
                    user_id=user.id,
                    details={"reason": reason, "challenge": challenge.id},
                ),
                tx,
            )
        return challenge

    async def _open(
        self, user: User, client: ClientInfo, agent: ParsedAgent, *, trust: bool, links: list[UserDevice]
    ) -> IssuedSession:
        """Step 10: the session, in one transaction with the bookkeeping and the audit row."""
        now = self._clock.now()
        notice = not trust and ever_trusted(links)  # only when the new-device rule is switched off
        async with self._db.transaction() as tx:
            issued, evicted = await self._sessions.open_session(tx, user, client, trust_device=trust)
            await tx.users.record_login(user.id, now)
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
            if notice:
                await self._mailer.queue(
                    tx,
                    "new_device",
                    user.email,
                    params={
                        "name": user.name,
                        "device": agent.label,
                        "location": "",
                        "time_utc": now.strftime("%Y-%m-%d %H:%M"),
                    },
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.ip,
                    dedupe_scope=issued.device_id,
                )
        await self._sessions.after_revocations(evicted)
        log.bind(user_id=user.id).info("logged in")
        return issued


def _link_for(links: list[UserDevice], device_id: str) -> UserDevice | None:
    if not DEVICE_ID.match(device_id):
        return None
    return next((link for link in links if link.device_id == device_id), None)
