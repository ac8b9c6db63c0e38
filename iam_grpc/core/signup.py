"""Signup (behaviour.md 2.3): limits, input rules, domain checks, password checks, hash, then
the account, its device and its first session in one transaction.

The steps run in the documented order and the first failure answers, so the
cheap refusals (limits, input) come before the lookups (DNS, breach range)
and those before the expensive argon2 hash. Nothing is written before the
final transaction, so a failure anywhere leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.observation import LearningPolicy, Observer, learned
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import PasswordHashing
from iam_grpc.core.ratelimit import pair_key
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_email, check_name
from iam_grpc.errors import EmailTaken, IamError
from iam_grpc.ids import new_ulid
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Conflict
from iam_grpc.storage.records import User

__all__ = ["EmailDomains", "SignupFlow", "SignupForm", "SignupPolicy"]

log = component_logger("iam.signup")


class EmailDomains(Protocol):
    """Disposable-list and MX checks of an email domain; raises EMAIL_DOMAIN_REJECTED."""

    async def check(self, domain: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SignupForm:
    email: str
    password: str
    name: str
    last_name: str
    terms_accepted: bool


@dataclass(frozen=True, slots=True)
class SignupPolicy:
    default_roles: tuple[str, ...]  # roles.default
    learning: LearningPolicy


class SignupFlow:
    def __init__(
        self,
        runtime: Runtime,
        rules: PasswordRules,
        hashing: PasswordHashing,
        domains: EmailDomains,
        sessions: Sessions,
        observer: Observer,
        policy: SignupPolicy,
        verification: EmailVerification | None = None,
    ) -> None:
        self._verification = verification
        self._run = runtime
        self._rules = rules
        self._hashing = hashing
        self._domains = domains
        self._sessions = sessions
        self._observer = observer
        self._policy = policy

    async def signup(
        self, client: ClientInfo, form: SignupForm, violations: Violations
    ) -> IssuedSession | None:
        """Steps 2-8 (the caller check and ``signup.ip`` ran in the interceptors).

        ``violations`` holds the client-context problems found by the servicer; the field rules
        add theirs and all are reported together. With ``email_verification.required`` there is no
        session (None): the account waits for its address to be proven (a link, or the email
        challenge of its first Login).
        """
        email = check_email(violations, "email", form.email)
        name = check_name(violations, "name", form.name, required=True)
        last_name = check_name(violations, "last_name", form.last_name, required=False)
        self._rules.check_new(
            violations, "password", form.password, email=email.norm if email else "", names=[name, last_name]
        )
        if not form.terms_accepted:
            violations.add("terms_accepted", "must be true: the terms were not accepted")
        violations.raise_any()
        assert email is not None

        await self._run.limiter.hit("signup.pair", pair_key(client.ip, email.norm))
        await self._run.limiter.hit("signup.email", email.norm)
        if client.device_id:
            await self._run.limiter.hit("signup.device", client.device_id)

        await self._domains.check(email.domain_ascii)
        await self._rules.ensure_not_breached(form.password)
        stored = await self._hashing.hash(form.password)

        now = self._run.clock.now()
        user = User(
            id=new_ulid(now),
            email=email.display,
            email_norm=email.norm,
            password_hash=stored.phc,
            pepper_id=stored.pepper_id or 0,
            name=name,
            last_name=last_name,
            locale=client.accept_language or None,
            terms_accepted_at=now,
            created_at=now,
            updated_at=now,
        )
        verification = self._verification
        required = verification is not None and verification.policy.required
        issued: IssuedSession | None = None
        evicted: list[str] = []
        try:
            async with self._run.db.transaction() as tx:
                await tx.users.insert(user)
                for role in self._policy.default_roles:
                    await tx.users.grant_role(user.id, role, "signup", now)
                if not required:
                    seen = self._observer.observe(client)
                    issued, evicted = await self._sessions.open_session(
                        tx,
                        user,
                        client,
                        trust_device=True,
                        # first sight of the device: its network, country and place (6.2)
                        shape_link=lambda link: learned(link, seen, client.ip, now, self._policy.learning),
                    )
                await self._run.audit.record(
                    self._run.audit.event(
                        "user.signup",
                        "ok",
                        user_id=user.id,
                        session_id=issued.session_id if issued else None,
                        device_id=issued.device_id if issued else None,
                    ),
                    tx,
                )
                await self._run.failpoints.hit("signup.before_commit")
        except Conflict as conflict:
            if conflict.constraint == "users.email_norm":
                raise EmailTaken() from None
            raise
        await self._sessions.after_revocations(evicted, evicted=True)
        log.bind(user_id=user.id).info("signed up")
        if verification is not None and (verification.policy.on_signup or required):
            await self._send_verification(verification, user, client)
        return issued

    async def _send_verification(
        self, verification: EmailVerification, user: User, client: ClientInfo
    ) -> None:
        """The account exists whatever happens to its verification mail: a mail limit or a store
        failure is logged, and RequestEmailVerification (or the first Login's challenge) sends
        another."""
        try:
            async with self._run.db.transaction() as tx:
                await verification.queue_link(tx, user, client.ip)
        except IamError:
            log.bind(user_id=user.id).warning("verification email not queued at signup")
