"""Step-up (behaviour.md 4.6): a challenge for one action of a signed-in session, and the
single-use grant that completing it yields."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from iam_grpc.core.call import current_call
from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.observation import Observer
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.validation import Violations
from iam_grpc.errors import ChallengeExpired, InvalidArgument, SessionRevoked
from iam_grpc.ids import GRANT_TOKEN, new_grant_token
from iam_grpc.storage.ports import Ephemeral

__all__ = ["Grant", "StepUp", "StepUpPolicy"]

_ACTION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_ACTION_RULE = "must match ^[a-z0-9][a-z0-9._-]{0,63}$"


@dataclass(frozen=True, slots=True)
class StepUpPolicy:
    grant_ttl: timedelta = timedelta(minutes=5)
    actions: tuple[str, ...] = ()  # empty: any action


@dataclass(frozen=True, slots=True)
class Grant:
    token: str
    action: str
    expires_at: datetime


def _grant_key(digest: str) -> str:
    return f"grant:{{{digest}}}"


def _caller() -> str:
    call = current_call()
    return call.caller.id if call is not None and call.caller is not None else "anonymous"


class StepUp:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        access: AccessTokens,
        challenges: Challenges,
        observer: Observer,
        policy: StepUpPolicy,
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._material = material
        self._access = access
        self._challenges = challenges
        self._observer = observer
        self._policy = policy

    async def start(
        self, client: ClientInfo, access_token: str, action: str, violations: Violations
    ) -> Challenge:
        """StartStepUp (4.6): one pending step-up per session; the same action gets it back, another
        action replaces it."""
        if not _ACTION.match(action):
            violations.add("action", _ACTION_RULE)
        elif self._policy.actions and action != "reauth" and action not in self._policy.actions:
            violations.add("action", "is not a configured step-up action")
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        limiter = self._run.limiter
        await limiter.hit("step_up.session", claims.session_id)
        await limiter.hit("step_up.user", claims.user_id)
        # Only the session's step-up: a pending refresh challenge is left alone (4.1).
        pending = await self._challenges.pending_for_session(claims.session_id, "step_up")
        if pending is not None:
            if pending.action == action:
                return pending
            await self._challenges.end(pending)
        async with self._run.db.transaction(read_only=True) as tx:
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

    async def grant(self, challenge: Challenge) -> Grant:
        """A completed step-up challenge: 256 random bits, stored only under a keyed hash with its
        user, session and action."""
        now = self._run.clock.now()
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
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            if challenge.session_id:
                await tx.sessions.set_auth(challenge.session_id, now)
            await audit.record(
                audit.event(
                    "step_up.granted",
                    "ok",
                    user_id=challenge.user_id,
                    session_id=challenge.session_id,
                    details={"action": challenge.action},
                ),
                tx,
            )
        return Grant(token, challenge.action or "", expires)

    async def consume(self, grant_token: str, action: str) -> tuple[str, str]:
        """ConsumeStepUpGrant: a wrong action leaves the grant alone; otherwise it is used up
        atomically, once. Returns the grant's user and session."""
        if not _ACTION.match(action):
            raise InvalidArgument.one("action", _ACTION_RULE)
        limiter = self._run.limiter
        if not GRANT_TOKEN.match(grant_token):
            await limiter.hit("grant.caller_fail", _caller())
            raise ChallengeExpired()
        key = _grant_key(self._material.keyed_hash("grant", grant_token))
        raw = await self._ephemeral.get(key)
        if raw is not None and json.loads(raw)["action"] != action:
            raise InvalidArgument.one("action", "is not the action this grant was given for")
        raw = await self._ephemeral.get_and_delete(key)
        if raw is None:
            await limiter.hit("grant.caller_fail", _caller())
            raise ChallengeExpired()
        record = json.loads(raw)
        if datetime.fromisoformat(record["expires_at"]) <= self._run.clock.now():
            raise ChallengeExpired()
        async with self._run.db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(record["session_id"])
        if session is None or session.revoked_at is not None:
            raise SessionRevoked()
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            await audit.record(
                audit.event(
                    "step_up.consumed",
                    "ok",
                    user_id=record["user_id"],
                    session_id=record["session_id"],
                    details={"action": action},
                ),
                tx,
            )
        return str(record["user_id"]), str(record["session_id"])
