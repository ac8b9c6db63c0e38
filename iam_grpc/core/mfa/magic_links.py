"""Magic links of MFA and step-up challenges (behaviour.md 4.5, 5.4): RedeemMagicLink and
InspectMagicLink.

The challenge's own device completes its challenge with the link; any other device only approves
it (an empty result), and the original device collects its Session by repeating its Login or
Refresh. A step-up link yields the grant to whoever redeems it. Inspecting never changes
anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from iam_grpc.core.call import current_call
from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.links import LinkClaims, Links
from iam_grpc.core.mfa.completion import ChallengeCompletion, Outcome
from iam_grpc.core.observation import Observer
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.validation import Violations
from iam_grpc.errors import ChallengeExpired, InvalidArgument, LinkUsed

__all__ = ["InspectedLink", "MagicLinks"]


@dataclass(frozen=True, slots=True)
class InspectedLink:
    purpose: str
    expires_at: datetime | None
    usable: bool


class MagicLinks:
    def __init__(
        self,
        runtime: Runtime,
        material: SecretMaterial,
        links: Links,
        challenges: Challenges,
        completion: ChallengeCompletion,
        observer: Observer,
        verification: EmailVerification | None = None,
    ) -> None:
        self._verification = verification
        self._run = runtime
        self._material = material
        self._links = links
        self._challenges = challenges
        self._completion = completion
        self._observer = observer

    async def redeem(
        self, client: ClientInfo, link_token: str, violations: Violations
    ) -> tuple[Outcome, str]:
        """RedeemMagicLink (4.5, 5.4): the challenge's device completes it; another device only
        approves it (an empty result), and a step-up link yields the grant to whoever redeems it."""
        violations.raise_any()
        purpose = self._links.read(link_token).purpose
        if purpose == "verify_email" and self._verification is not None:
            await self._verification.redeem(link_token)
            return Outcome(), purpose
        if purpose not in ("mfa", "step_up"):
            raise InvalidArgument.one("link_token", "is not a link for this operation")
        claims = await self._links.verify(link_token, "step_up" if purpose == "step_up" else "mfa")
        challenge = await self._challenges.get(str(claims.extra["cid"]))
        now = self._run.clock.now()
        if challenge is None or claims.jti not in challenge.link_jtis or challenge.user_id != claims.subject:
            raise LinkUsed()
        if not challenge.live(now):
            raise ChallengeExpired() if challenge.expires_at <= now else LinkUsed()
        seen = self._observer.observe(client)
        await self._run.failpoints.hit("redeem.before_finish")
        if challenge.kind != "step_up" and not challenge.comes_from(client.device_id, seen.agent):
            await self._finish_by_link(challenge.id, approve_only=True)
            await self._links.mark_used(claims)
            audit = self._run.audit
            async with self._run.db.transaction() as tx:
                await audit.record(
                    audit.event(
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
        return await self._completion.complete(challenge, client, seen), purpose

    async def _finish_by_link(self, challenge_id: str, *, approve_only: bool = False) -> Challenge:
        """Move the challenge on for a link. Losing the compare-and-set to another redemption of
        the link (or to its code) means the link has done its work: LINK_USED (S38), unless the
        challenge expired in between."""
        try:
            return await self._challenges.finish(challenge_id, approve_only=approve_only)
        except ChallengeExpired:
            current = await self._challenges.get(challenge_id)
            if current is None or current.expires_at <= self._run.clock.now():
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
            await self._run.limiter.hit("link_inspect.caller_invalid", caller)
            return InspectedLink("", None, False)
        await self._run.limiter.hit("link_inspect.link", claims.jti)
        return InspectedLink(claims.purpose, claims.expires_at, await self._usable(claims))

    async def _usable(self, claims: LinkClaims) -> bool:
        now = self._run.clock.now()
        if claims.expires_at <= now or await self._links.is_used(claims.jti):
            return False
        if claims.purpose in ("mfa", "step_up"):
            challenge = await self._challenges.get(str(claims.extra["cid"]))
            return challenge is not None and challenge.live(now) and claims.jti in challenge.link_jtis
        if claims.purpose == "verify_email":
            return self._verification is not None and await self._verification.usable(claims)
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.subject)
        if user is None or user.status != "active" or user.credential_version != claims.extra.get("cv"):
            return False
        if claims.purpose == "email_change":
            return self._material.keyed_hash("email", user.email_norm) == claims.extra.get("oeh")
        return True
