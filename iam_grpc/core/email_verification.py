"""Email verification: RequestEmailVerification mails a ``verify_email`` link; redeeming it
(RedeemMagicLink) sets ``email_verified_at``.

The link names the address it verifies by its keyed hash (``oeh``), so a link sent before an
email change cannot verify the new address. Single use: the used mark, and the state check that
the address is still unverified (a second redemption answers LINK_USED).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.links import LinkClaims, Links
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.validation import Violations
from iam_grpc.errors import LinkUsed, SessionRevoked
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User

__all__ = ["EmailVerification", "VerificationPolicy"]

log = component_logger("iam.email")


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    link_ttl: timedelta = timedelta(hours=24)
    on_signup: bool = False  # Signup mails the link
    required: bool = False  # no session before the address is verified


class EmailVerification:
    def __init__(
        self,
        runtime: Runtime,
        material: SecretMaterial,
        access: AccessTokens,
        links: Links,
        policy: VerificationPolicy,
    ) -> None:
        self._run = runtime
        self._material = material
        self._access = access
        self._links = links
        self.policy = policy

    def _address_hash(self, email_norm: str) -> str:
        return self._material.keyed_hash("email", email_norm)

    async def queue_link(self, tx: Transaction, user: User, ip: str | None) -> None:
        """Queue the ``verify_email`` mail in ``tx`` (the mail limits of 7.4 apply)."""
        link = self._links.issue(
            "verify_email", user.id, self.policy.link_ttl, oeh=self._address_hash(user.email_norm)
        )
        await self._run.mailer.queue(
            tx,
            "verify_email",
            user.email,
            params={
                "name": user.name,
                "hours_left": max(1, int(self.policy.link_ttl.total_seconds() // 3600)),
            },
            secrets={"link": link.url},
            user_id=user.id,
            locale=user.locale,
            ip=ip,
            not_after=link.expires_at,
        )
        await self._run.audit.record(
            self._run.audit.event("email.verification_sent", "ok", user_id=user.id, ip=ip), tx
        )

    async def request(self, client: ClientInfo, access_token: str, violations: Violations) -> None:
        """RequestEmailVerification: OK without sending when the address is verified already."""
        violations.raise_any()
        claims = await self._access.verify_from_device(access_token, client.device_id)
        async with self._run.db.transaction() as tx:
            user = await tx.users.get(claims.user_id)
            if user is None or user.status != "active":
                raise SessionRevoked()
            if user.email_verified_at is not None:
                return
            await self._run.limiter.hit("verify_email.user", user.id)
            await self.queue_link(tx, user, client.ip)
        log.bind(user_id=user.id).info("email verification sent")

    async def redeem(self, link_token: str) -> None:
        """RedeemMagicLink of purpose ``verify_email``: the address, still the user's and still
        unverified, becomes verified; otherwise LINK_USED."""
        claims = await self._links.verify(link_token, "verify_email")
        now = self._run.clock.now()
        async with self._run.db.transaction() as tx:
            user = await tx.users.get(claims.subject)
            if not self._still_usable(user, claims):
                raise LinkUsed()
            assert user is not None
            await tx.users.mark_email_verified(user.id, now)
            await self._run.audit.record(self._run.audit.event("email.verified", "ok", user_id=user.id), tx)
        await self._links.mark_used(claims)
        log.bind(user_id=claims.subject).info("email verified")

    def _still_usable(self, user: User | None, claims: LinkClaims) -> bool:
        return (
            user is not None
            and user.status == "active"
            and user.email_verified_at is None
            and self._address_hash(user.email_norm) == claims.extra.get("oeh")
        )

    async def usable(self, claims: LinkClaims) -> bool:
        """For InspectMagicLink: the linked state still lets the link work."""
        async with self._run.db.transaction(read_only=True) as tx:
            user = await tx.users.get(claims.subject)
        return self._still_usable(user, claims)
