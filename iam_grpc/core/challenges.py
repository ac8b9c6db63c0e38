"""Email MFA challenges (behaviour.md 4.1): creating them and finding pending ones.

A challenge lives in the ephemeral store as ``mfa:ch:{id}`` (JSON) until a
minute past its expiry; pointers find the pending one of a (user, device) for
logins, of a session for refreshes, and every pending one of a user (at most
``mfa.max_pending_per_user``). The code is stored only as a keyed hash bound to
the challenge id, so a dump of the store reveals no code and two users' codes
never collide.

Creating one checks the mail limits and queues the code email in the same
step; when the email cannot be queued the record is deleted again, so there
is never a challenge whose code nobody was sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.devices import COARSE_FIELDS
from iam_grpc.core.links import Links
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.errors import BackendUnavailable, IamError, RateLimited
from iam_grpc.ids import new_challenge_id
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database, Ephemeral
from iam_grpc.storage.records import User
from iam_grpc.ua import ParsedAgent

__all__ = ["REASON_TEXT", "Challenge", "ChallengePolicy", "Challenges"]

log = component_logger("iam.mfa")

ChallengeKind = Literal["login", "refresh", "step_up"]
_GRACE = timedelta(seconds=60)
_CAS_TRIES = 8

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
}


@dataclass(frozen=True, slots=True)
class ChallengePolicy:
    code_length: int = 6
    ttl: timedelta = timedelta(minutes=10)
    max_attempts: int = 5
    max_resends: int = 3
    max_pending_per_user: int = 3


@dataclass(frozen=True, slots=True)
class Challenge:
    id: str
    kind: str
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
        current = _coarse(agent)
        return device_id == self.device_id and all(
            (self.fingerprint.get(name) or "") == current.get(name, "") for name in COARSE_FIELDS
        )


def _coarse(agent: ParsedAgent) -> dict[str, str]:
    return {name: str(getattr(agent, name) or "") for name in COARSE_FIELDS}


def _challenge_key(challenge_id: str) -> str:
    return f"mfa:ch:{{{challenge_id}}}"


def _login_key(user_id: str, device_id: str) -> str:
    return f"mfa:login:{{{user_id}:{device_id}}}"


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
    ) -> None:
        self._db = db
        self._ephemeral = ephemeral
        self._material = material
        self._clock = clock
        self._mailer = mailer
        self._links = links
        self._policy = policy

    def code_hash(self, challenge_id: str, code: str) -> str:
        return self._material.keyed_hash("otp", f"{challenge_id}:{code}")

    def _new_code(self) -> str:
        n = self._policy.code_length
        return str(secrets.randbelow(10**n)).zfill(n)  # uniform over the range, leading zeros included

    async def get(self, challenge_id: str) -> Challenge | None:
        raw = await self._ephemeral.get(_challenge_key(challenge_id))
        return Challenge.from_json(raw) if raw is not None else None

    async def pending_login(self, user_id: str, device_id: str, agent: ParsedAgent) -> Challenge | None:
        """The pending or approved login challenge this (user, device) raised, if any."""
        pointer = await self._ephemeral.get(_login_key(user_id, device_id))
        if pointer is None:
            return None
        challenge = await self.get(pointer.decode())
        now = self._clock.now()
        if (
            challenge is None
            or challenge.state not in ("pending", "approved")
            or challenge.expires_at <= now
            or not challenge.comes_from(device_id, agent)
        ):
            return None
        return challenge

    async def create_login(
        self,
        user: User,
        reason: str,
        client: Mapping[str, str],
        agent: ParsedAgent,
        *,
        device_label: str,
        location: str,
    ) -> Challenge:
        """A new login challenge and its code email; the caller checked for a pending one first."""
        now = self._clock.now()
        code = self._new_code()
        challenge_id = new_challenge_id()
        expires = now + self._policy.ttl
        challenge = Challenge(
            id=challenge_id,
            kind="login",
            user_id=user.id,
            reason=reason,
            device_id=client.get("device_id", ""),
            fingerprint=_coarse(agent),
            code_hash=self.code_hash(challenge_id, code),
            attempts_left=self._policy.max_attempts,
            resends_left=self._policy.max_resends,
            created_at=now,
            expires_at=expires,
            last_sent_at=now,
            client=dict(client),
        )
        link = self._links.issue("mfa", user.id, self._policy.ttl, cid=challenge_id)
        challenge = replace(challenge, link_jtis=[link.jti])
        await self._reserve_pending(user.id, challenge_id, expires)
        ttl = self._policy.ttl + _GRACE
        try:
            await self._ephemeral.set(_challenge_key(challenge_id), challenge.to_json(), ttl)
            async with self._db.transaction() as tx:
                await self._mailer.queue(
                    tx,
                    "mfa_code",
                    user.email,
                    params={
                        "name": user.name,
                        "reason_text": REASON_TEXT.get(reason, "a security check"),
                        "device": device_label,
                        "location": location,
                        "time_utc": now.strftime("%Y-%m-%d %H:%M"),
                        "minutes_left": int(self._policy.ttl.total_seconds() // 60),
                    },
                    secrets={"code": code, "link": link.url},
                    user_id=user.id,
                    locale=user.locale,
                    ip=client.get("ip"),
                    not_after=expires,
                )
        except BaseException as error:
            await self._forget(challenge)
            if isinstance(error, IamError):
                raise
            if isinstance(error, Exception):
                raise BackendUnavailable() from error
            raise
        await self._ephemeral.set(_login_key(user.id, challenge.device_id), challenge_id.encode(), ttl)
        log.bind(user_id=user.id, reason=reason).info("mfa challenge created")
        return challenge

    async def _reserve_pending(self, user_id: str, challenge_id: str, expires: datetime) -> None:
        """Add the challenge to the user's pending list, at most ``max_pending_per_user`` (else
        RATE_LIMITED, scope user). A compare-and-set loop keeps replicas from overshooting."""
        key = _user_key(user_id)
        for _ in range(_CAS_TRIES):
            raw = await self._ephemeral.get(key)
            now = self._clock.now()
            entries = {k: v for k, v in (json.loads(raw) if raw else {}).items() if v > now.timestamp()}
            live = await self._still_pending(entries)
            if len(live) >= self._policy.max_pending_per_user:
                wait = min(live.values()) - now.timestamp()
                raise RateLimited(timedelta(seconds=max(1.0, wait)), "user")
            live[challenge_id] = expires.timestamp()
            updated = json.dumps(live, separators=(",", ":")).encode()
            ttl = self._policy.ttl + _GRACE
            if raw is None:
                if await self._ephemeral.set_if_absent(key, updated, ttl):
                    return
            elif await self._ephemeral.compare_and_set(key, raw, updated, ttl):
                return
        raise BackendUnavailable()

    async def _still_pending(self, entries: dict[str, float]) -> dict[str, float]:
        live: dict[str, float] = {}
        for challenge_id, expires in entries.items():
            challenge = await self.get(challenge_id)
            if challenge is not None and challenge.state in ("pending", "approved"):
                live[challenge_id] = expires
        return live

    async def _forget(self, challenge: Challenge) -> None:
        try:
            await self._ephemeral.delete(_challenge_key(challenge.id))
        except BackendUnavailable:
            log.warning("could not delete a challenge whose email failed")
