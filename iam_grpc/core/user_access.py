"""Ending a user's access: disabling and erasing an account, for the admin RPCs and the CLI
alike (``iam_grpc.admin`` calls these).

Disabling ends, in the transaction that sets the status, every session (``sessions.revoked_at``),
every API token (``api_tokens.revoked_at`` and ``pat`` revocations), and every mailed link (the
credential version moves on, which every link carries); after the commit the deny-list entries are
written, so every replica refuses the user's access tokens and API tokens at once, and pending
challenges of the ended sessions are ended (challenges without a session check the user's status
when completed). A disabled user's login fails exactly like a wrong password (``core/login.py``).

Erasing does the same and then removes the personal data: the row stays under its id with status
``deleted`` and no address or name; audit rows stay under the id, without addresses, devices or
details.
"""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.clock import Clock
from iam_grpc.core.api_tokens import end_user_api_tokens
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import end_session_challenges
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.storage.ports import Database, Ephemeral, Transaction

__all__ = ["AccessEnded", "UserAccess"]


@dataclass(frozen=True, slots=True)
class AccessEnded:
    sessions: list[str]
    api_secrets: list[str]
    cached: bool  # the deny-list cache took the entries (else replicas read SQL until it is rebuilt)


@dataclass(frozen=True, slots=True)
class UserAccess:
    db: Database
    clock: Clock
    audit: AuditTrail
    denylist: DenyList
    ephemeral: Ephemeral | None  # None: not the serving processes' own store (the CLI in embedded mode)

    async def end_in(self, tx: Transaction, user_id: str, reason: str) -> tuple[list[str], list[str]]:
        """Revoke sessions and API tokens in ``tx``; pass the result to :meth:`after_commit`."""
        now = self.clock.now()
        sessions = await tx.sessions.revoke_all(user_id, reason, now)
        await self.audit.sessions_revoked(tx, user_id, sessions, reason)
        secrets = await end_user_api_tokens(tx, self.denylist, user_id, reason, now)
        return sessions, secrets

    async def after_commit(self, sessions: list[str], secrets: list[str]) -> AccessEnded:
        cached = await self.denylist.revoke_sessions(sessions)
        cached = await self.denylist.revoke_api_secrets(secrets) and cached
        if self.ephemeral is not None:
            await end_session_challenges(self.ephemeral, sessions)
        return AccessEnded(sessions, secrets, cached)

    async def erase(self, user_id: str, *, details: dict[str, object] | None = None) -> AccessEnded | None:
        """Erase a user (None when there is no such live or disabled user)."""
        async with self.db.transaction() as tx:
            user = await tx.users.get(user_id)
            if user is None or user.status == "deleted":
                return None
            sessions, secrets = await self.end_in(tx, user_id, "deleted")
            # written before the erasure, which then strips it like every other row of the user
            await self.audit.record(
                self.audit.event("user.deleted", "ok", user_id=user_id, details=details), tx
            )
            await tx.api_tokens.delete_of(user_id)
            await tx.directory.erase(user_id, self.clock.now())
        return await self.after_commit(sessions, secrets)
