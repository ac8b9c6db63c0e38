"""Email MFA challenges (behaviour.md 4.1): the record, its pointers and its state changes.

A challenge lives in the ephemeral store as ``mfa:ch:{id}`` (JSON) until a
minute past its expiry. Pointers find the pending one of a (user, device) for
logins and, one per kind, of a session for refreshes and step-ups (a step-up never
displaces a pending refresh challenge, nor the other way round); ``mfa:user:{user}`` lists
every pending one of a user (at most ``mfa.max_pending_per_user``). The code is
stored only as a keyed hash bound to the challenge id, so a dump of the store
reveals no code and two users' codes never collide.

Every change of a record (a wrong code, approval, completion, a resend) is a
compare-and-set on its JSON, so replicas racing on one challenge cannot both
win and attempts can never be spent twice. Creating one queues the code email
in the caller's transaction or its own; when the email cannot be queued the
record is deleted again, so there is never a challenge whose code nobody was
sent.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.client import ParsedAgent
from iam_grpc.core.crypto import SecretMaterial, constant_time_equal
from iam_grpc.core.devices import COARSE_FIELDS
from iam_grpc.core.links import IssuedLink, Links
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.errors import BackendUnavailable, ChallengeExpired, IamError, InvalidArgument, RateLimited
from iam_grpc.ids import new_challenge_id
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database, Ephemeral, Transaction
from iam_grpc.storage.records import User

__all__ = ["REASON_TEXT", "Challenge", "ChallengePolicy", "Challenges"]

log = component_logger("iam.mfa")

_GRACE = timedelta(seconds=60)
_CAS_TRIES = 16
LIVE = ("pending", "approved")

REASON_TEXT: dict[str, str] = {
    "NEW_DEVICE": "a sign-in from a device we have not seen for your account",
    "IDLE": "a session that had not been used for a while",
    "TOO_MANY_SESSIONS": "an unusual number of open sessions",
    "IP_CHANGED": "a sign-in from a new network",
    "SUSPICIOUS_ACTIVITY": "unusual activity from this network or device",
    "PROXY_OR_HOSTING": "a connection through a proxy, VPN or hosting provider",
    "FINGERPRINT_CHANGED": "a change in the browser or device",
    "IMPOSSIBLE_TRAVEL": "a sign-in from a location too far from the last one",
    "SECURITY_HOLD": "a recent security event on your account",
    "STEP_UP": "a sensitive action",
    "EMAIL_UNVERIFIED": "a first sign-in: the code confirms your email address",
}


@dataclass(frozen=True, slots=True)
class ChallengePolicy:
    code_length: int = 6
    ttl: timedelta = timedelta(minutes=10)
    max_attempts: int = 5
    resend_interval: timedelta = timedelta(seconds=60)
    max_resends: int = 3
    max_lifetime: timedelta = timedelta(minutes=30)
    max_pending_per_user: int = 3
    email_with_totp: bool = True  # a user with TOTP may still complete a challenge by email


@dataclass(frozen=True, slots=True)
class Challenge:
    id: str
    kind: str  # login, refresh, step_up
    user_id: str
    reason: str
    device_id: str  # the raising request's client.device_id (may be empty)
    fingerprint: dict[str, str]  # its coarse fingerprint (browser family, OS family, device type)
    code_hash: str
    attempts_left: int
    resends_left: int
    created_at: datetime
    expires_at: datetime
    last_sent_at: datetime
    client: dict[str, str]  # ip, user_agent, device_id, accept_language of the raising request
    state: str = "pending"  # pending, approved, done, failed
    session_id: str | None = None
    token_hash: str | None = None  # refresh kind: the presented refresh token's hash
    action: str | None = None  # step-up kind
    link_jtis: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=lambda: ["email"])  # preferred first
    proved_by: str = ""  # email, totp or recovery_code, once done: only email proves the mailbox

    def to_json(self) -> bytes:
        data = asdict(self)
        for name in ("created_at", "expires_at", "last_sent_at"):
            data[name] = getattr(self, name).isoformat()
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Challenge:
        data: dict[str, Any] = json.loads(raw)
        for name in ("created_at", "expires_at", "last_sent_at"):
            data[name] = datetime.fromisoformat(data[name])
        return cls(**data)

    def comes_from(self, device_id: str, agent: ParsedAgent) -> bool:
        """Same device id (both empty counts) and the same coarse fingerprint (4.1)."""
        current = coarse(agent)
        return device_id == self.device_id and all(
            (self.fingerprint.get(name) or "") == current.get(name, "") for name in COARSE_FIELDS
        )

    def live(self, now: datetime) -> bool:
        return self.state in LIVE and self.expires_at > now


def coarse(agent: ParsedAgent) -> dict[str, str]:
    return {name: str(getattr(agent, name) or "") for name in COARSE_FIELDS}


def _challenge_key(challenge_id: str) -> str:
    return f"mfa:ch:{{{challenge_id}}}"


def _login_key(user_id: str, device_id: str, fingerprint: Mapping[str, str]) -> str:
    """One login challenge per (user, device): the device is its id (often empty before the first
    sign-in) and its coarse fingerprint, so a laptop and a phone that both lack a device id do not
    take each other's place and make each repeated login mail a new code."""
    shape = hashlib.sha256("\x1f".join(fingerprint.get(name, "") for name in COARSE_FIELDS).encode())
    return f"mfa:login:{{{user_id}:{device_id}}}:{shape.hexdigest()[:16]}"


def _session_key(session_id: str, kind: str = "refresh") -> str:
    """One pointer per kind: the refresh challenge keeps the original key, a step-up has its own."""
    suffix = "" if kind == "refresh" else f":{kind}"
    return f"mfa:sess:{{{session_id}}}{suffix}"


_SESSION_KINDS = ("refresh", "step_up")


def _user_key(user_id: str) -> str:
    return f"mfa:user:{{{user_id}}}"


class Challenges:
    def __init__(
        self,
        db: Database,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        clock: Clock,
        mailer: Mailer,
        links: Links,
        policy: ChallengePolicy,
        audit: AuditTrail | None = None,
    ) -> None:
        self._audit = audit
        self._db = db
        self._ephemeral = ephemeral
        self._material = material
        self._clock = clock
        self._mailer = mailer
        self._links = links
        self.policy = policy

    # codes -------------------------------------------------------------------------------

    def _code_hash(self, challenge_id: str, code: str) -> str:
        return self._material.keyed_hash("otp", f"{challenge_id}:{code}")

    def code_matches(self, challenge: Challenge, code: str) -> bool:
        return constant_time_equal(self._code_hash(challenge.id, code), challenge.code_hash)

    def _new_code(self) -> str:
        n = self.policy.code_length
        return str(secrets.randbelow(10**n)).zfill(n)  # uniform over the range, leading zeros included

    # reading -----------------------------------------------------------------------------

    async def get(self, challenge_id: str) -> Challenge | None:
        raw = await self._ephemeral.get(_challenge_key(challenge_id))
        return Challenge.from_json(raw) if raw is not None else None

    async def _pointed(self, key: str) -> Challenge | None:
        pointer = await self._ephemeral.get(key)
        if pointer is None:
            return None
        challenge = await self.get(pointer.decode())
        return challenge if challenge is not None and challenge.live(self._clock.now()) else None

    async def pending_login(self, user_id: str, device_id: str, agent: ParsedAgent) -> Challenge | None:
        """The live login challenge this (user, device) raised, if any."""
        challenge = await self._pointed(_login_key(user_id, device_id, coarse(agent)))
        return challenge if challenge is not None and challenge.comes_from(device_id, agent) else None

    async def pending_for_session(self, session_id: str, kind: str = "refresh") -> Challenge | None:
        """The live challenge of this kind (refresh or step-up) of a session, if any."""
        challenge = await self._pointed(_session_key(session_id, kind))
        return challenge if challenge is not None and challenge.kind == kind else None

    # creating ----------------------------------------------------------------------------

    async def create(
        self,
        kind: str,
        user: User,
        reason: str,
        client: Mapping[str, str],
        agent: ParsedAgent,
        *,
        device_label: str,
        location: str,
        tx: Transaction | None = None,
        session_id: str | None = None,
        token_hash: str | None = None,
        action: str | None = None,
    ) -> Challenge:
        """A new challenge and its code email (queued in ``tx`` when given); the caller checked for
        a pending one first."""
        now = self._clock.now()
        code = self._new_code()
        challenge_id = new_challenge_id()
        # only the mailbox can prove the mailbox: no other channel for an unverified address
        channels = ["email"] if reason == "EMAIL_UNVERIFIED" else await self._channels(user.id, tx)
        emailed = "email" in channels
        link = self._links.issue(
            "step_up" if kind == "step_up" else "mfa", user.id, self.policy.ttl, cid=challenge_id
        )
        challenge = Challenge(
            id=challenge_id,
            kind=kind,
            user_id=user.id,
            reason=reason,
            device_id=client.get("device_id", ""),
            fingerprint=coarse(agent),
            code_hash=self._code_hash(challenge_id, code) if emailed else "",
            attempts_left=self.policy.max_attempts,
            resends_left=self.policy.max_resends,
            created_at=now,
            expires_at=now + self.policy.ttl,
            last_sent_at=now,
            client=dict(client),
            session_id=session_id,
            token_hash=token_hash,
            action=action,
            link_jtis=[link.jti] if emailed else [],
            channels=channels,
        )
        await self._reserve_pending(user.id, challenge_id, challenge.expires_at)
        ttl = self.policy.ttl + _GRACE
        try:
            await self._ephemeral.set(_challenge_key(challenge_id), challenge.to_json(), ttl)
            if emailed:
                await self._send(
                    challenge, user, code, link, device_label=device_label, location=location, tx=tx
                )
        except BaseException as error:
            await self._forget(challenge)
            if isinstance(error, IamError) or not isinstance(error, Exception):
                raise
            raise BackendUnavailable() from error
        pointer = (
            _login_key(user.id, challenge.device_id, challenge.fingerprint)
            if kind == "login"
            else _session_key(session_id or "", kind)
        )
        await self._ephemeral.set(pointer, challenge_id.encode(), self.policy.max_lifetime + _GRACE)
        log.bind(user_id=user.id, reason=reason, challenge_kind=kind).info("mfa challenge created")
        return challenge

    async def _channels(self, user_id: str, tx: Transaction | None) -> list[str]:
        """TOTP first when the user has it; email unless TOTP is on and email is configured off."""
        if tx is not None:
            has_totp = await tx.totp.get(user_id) is not None
        else:
            async with self._db.transaction(read_only=True) as own:
                has_totp = await own.totp.get(user_id) is not None
        if not has_totp:
            return ["email"]
        return ["totp", "email"] if self.policy.email_with_totp else ["totp"]

    async def _send(
        self,
        challenge: Challenge,
        user: User,
        code: str,
        link: IssuedLink,
        *,
        device_label: str,
        location: str,
        tx: Transaction | None,
    ) -> None:
        minutes = max(1, int((challenge.expires_at - self._clock.now()).total_seconds() // 60))
        if challenge.kind == "step_up":
            kind = "step_up_code"
            params: dict[str, object] = {
                "action": challenge.action or "",
                "device": device_label,
                "location": location,
            }
        else:
            kind = "mfa_code"
            params = {
                "reason_text": REASON_TEXT.get(challenge.reason, "a security check"),
                "device": device_label,
                "location": location,
                "time_utc": self._clock.now().strftime("%Y-%m-%d %H:%M"),
            }

        async def queue(into: Transaction) -> None:
            await self._mailer.queue(
                into,
                kind,
                user.email,
                params={"name": user.name, "minutes_left": minutes, **params},
                secrets={"code": code, "link": link.url},
                user_id=user.id,
                locale=user.locale,
                ip=challenge.client.get("ip"),
                not_after=challenge.expires_at,
            )
            if self._audit is not None:
                await self._audit.record(
                    self._audit.event(
                        "mfa.sent",
                        "ok",
                        user_id=user.id,
                        session_id=challenge.session_id,
                        device_id=challenge.device_id or None,
                        ip=challenge.client.get("ip"),
                        details={
                            "challenge_id": challenge.id,
                            "kind": challenge.kind,
                            "reason": challenge.reason,
                            "resend": challenge.resends_left < self.policy.max_resends,
                        },
                    ),
                    into,
                )

        if tx is not None:
            await queue(tx)
        else:
            async with self._db.transaction() as own:
                await queue(own)

    async def _reserve_pending(self, user_id: str, challenge_id: str, expires: datetime) -> None:
        """Add the challenge to the user's pending list, at most ``max_pending_per_user`` (else
        RATE_LIMITED, scope user). A compare-and-set loop keeps replicas from overshooting."""
        key = _user_key(user_id)
        for _ in range(_CAS_TRIES):
            raw = await self._ephemeral.get(key)
            now = self._clock.now()
            entries = {k: v for k, v in (json.loads(raw) if raw else {}).items() if v > now.timestamp()}
            live = await self._still_pending(entries)
            if len(live) >= self.policy.max_pending_per_user:
                wait = min(live.values()) - now.timestamp()
                raise RateLimited(timedelta(seconds=max(1.0, wait)), "user")
            live[challenge_id] = expires.timestamp()
            updated = json.dumps(live, separators=(",", ":")).encode()
            ttl = self.policy.max_lifetime + _GRACE
            if raw is None:
                if await self._ephemeral.set_if_absent(key, updated, ttl):
                    return
            elif await self._ephemeral.compare_and_set(key, raw, updated, ttl):
                return
        raise BackendUnavailable()

    async def _still_pending(self, entries: dict[str, float]) -> dict[str, float]:
        live: dict[str, float] = {}
        now = self._clock.now()
        for challenge_id, expires in entries.items():
            challenge = await self.get(challenge_id)
            if challenge is not None and challenge.live(now):
                live[challenge_id] = expires
        return live

    async def _forget(self, challenge: Challenge) -> None:
        try:
            await self._ephemeral.delete(_challenge_key(challenge.id))
        except BackendUnavailable:
            log.warning("could not delete a challenge whose email failed")

    # changing ----------------------------------------------------------------------------

    async def update(
        self,
        challenge_id: str,
        change: Callable[[Challenge], Challenge | None],
        ttl: timedelta | None = None,
    ) -> tuple[Challenge, Challenge] | None:
        """Apply ``change`` to the stored record atomically (compare-and-set, retried); ``change``
        returns None to leave it alone. Returns (before, after), or None when there is no record or
        nothing changed."""
        key = _challenge_key(challenge_id)
        for _ in range(_CAS_TRIES):
            raw = await self._ephemeral.get(key)
            if raw is None:
                return None
            before = Challenge.from_json(raw)
            after = change(before)
            if after is None:
                return None
            if await self._ephemeral.compare_and_set(key, raw, after.to_json(), ttl):
                return before, after
        raise BackendUnavailable()

    async def spend_attempt(self, challenge_id: str) -> int:
        """One wrong code: attempts decrease in the same atomic step that reads them; the last one
        fails the challenge. Returns the attempts left (0: the challenge is over)."""
        now = self._clock.now()

        def wrong(challenge: Challenge) -> Challenge | None:
            if not challenge.live(now):
                return None
            left = challenge.attempts_left - 1
            return replace(challenge, attempts_left=left, state="failed" if left <= 0 else challenge.state)

        changed = await self.update(challenge_id, wrong)
        if changed is None:
            raise ChallengeExpired()
        return changed[1].attempts_left

    async def finish(
        self, challenge_id: str, *, approve_only: bool = False, proved_by: str = "email"
    ) -> Challenge:
        """pending/approved -> done (or pending -> approved); losing the race is CHALLENGE_EXPIRED."""
        now = self._clock.now()

        def move(challenge: Challenge) -> Challenge | None:
            if not challenge.live(now) or (approve_only and challenge.state != "pending"):
                return None
            return replace(challenge, state="approved" if approve_only else "done", proved_by=proved_by)

        changed = await self.update(challenge_id, move)
        if changed is None:
            raise ChallengeExpired()
        return changed[1]

    async def end(self, challenge: Challenge) -> None:
        """Fail a live challenge (a replaced step-up, a revoked session)."""
        await self.update(challenge.id, lambda c: replace(c, state="failed") if c.state in LIVE else None)

    async def resend(
        self, challenge: Challenge, user: User, *, device_label: str, location: str
    ) -> Challenge:
        """A new code and link for the same challenge (4.3); the old code stops working, attempts
        are not restored, the expiry moves to now + ttl but never past created_at + max_lifetime."""
        if "email" not in challenge.channels:
            raise InvalidArgument.one("challenge_id", "has no email channel to resend")
        now = self._clock.now()
        code = self._new_code()
        link_ttl = min(now + self.policy.ttl, challenge.created_at + self.policy.max_lifetime) - now
        if link_ttl <= timedelta(0):
            raise ChallengeExpired()
        link = self._links.issue(
            "step_up" if challenge.kind == "step_up" else "mfa", user.id, link_ttl, cid=challenge.id
        )

        def renew(current: Challenge) -> Challenge | None:
            if not current.live(now) or current.resends_left <= 0:
                return None
            if now - current.last_sent_at < self.policy.resend_interval:
                return None
            return replace(
                current,
                code_hash=self._code_hash(current.id, code),
                resends_left=current.resends_left - 1,
                last_sent_at=now,
                expires_at=now + link_ttl,
                link_jtis=[*current.link_jtis, link.jti],
            )

        changed = await self.update(challenge.id, renew, ttl=link_ttl + _GRACE)
        if changed is None:
            current = await self.get(challenge.id)
            if current is None or not current.live(now):
                raise ChallengeExpired()
            wait = self.policy.resend_interval - (now - current.last_sent_at)
            if current.resends_left <= 0:
                wait = current.expires_at - now
            raise RateLimited(max(wait, timedelta(seconds=1)), "challenge")
        before, renewed = changed
        try:
            await self._send(renewed, user, code, link, device_label=device_label, location=location, tx=None)
        except IamError:
            # Not sent (a mail limit): the previous code, expiry and resend budget stand.
            await self.update(
                challenge.id,
                lambda c: replace(
                    c,
                    code_hash=before.code_hash,
                    resends_left=c.resends_left + 1,
                    last_sent_at=before.last_sent_at,
                    expires_at=before.expires_at,
                    link_jtis=before.link_jtis,
                ),
            )
            raise
        return renewed


async def end_session_challenges(ephemeral: Ephemeral, session_ids: list[str]) -> None:
    """Revoking a session ends its pending refresh and step-up challenges (behaviour.md 1.6), so no
    code or link of a dead session is mailed again or accepted (the service and the CLI both call
    this). Best effort: with the store down the challenge is unusable anyway (every MFA call
    answers BACKEND_UNAVAILABLE), and a revoked session fails every later check on its own."""
    for session_id, kind in ((s, k) for s in session_ids for k in _SESSION_KINDS):
        try:
            pointer = await ephemeral.get(_session_key(session_id, kind))
            if pointer is not None:
                key = _challenge_key(pointer.decode())
                for _ in range(_CAS_TRIES):
                    raw = await ephemeral.get(key)
                    if raw is None:
                        break
                    challenge = Challenge.from_json(raw)
                    if challenge.state not in LIVE:
                        break
                    if await ephemeral.compare_and_set(
                        key, raw, replace(challenge, state="failed").to_json()
                    ):
                        break
            await ephemeral.delete(_session_key(session_id, kind))
        except BackendUnavailable:
            log.bind(session_id=session_id).warning("could not end the challenge of a revoked session")
