"""The components operator use-cases work with, and opening them for the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from iam_grpc.clock import Clock, SystemClock
from iam_grpc.config import Settings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import end_session_challenges
from iam_grpc.core.cleanup import Cleanup
from iam_grpc.core.keys import KeyRing
from iam_grpc.core.ratelimit import RateLimiter, email_key
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.user_access import UserAccess
from iam_grpc.ids import ULID_RE
from iam_grpc.metrics import Metrics
from iam_grpc.secret_material import resolve_secrets
from iam_grpc.storage.ports import Database, Transaction
from iam_grpc.storage.records import User
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.wiring import Components, Stores, open_stores
from iam_grpc.wiring import builders as b

__all__ = ["AdminTools", "open_admin", "open_outbox"]


@dataclass(frozen=True, slots=True)
class AdminTools:
    clock: Clock
    stores: Stores
    keys: KeyRing  # read with reload() by the use-cases that need it
    audit: AuditTrail
    denylist: DenyList
    limiter: RateLimiter
    cleanup: Cleanup
    # False: the ephemeral store is not the serving processes' own (embedded mode, from the CLI),
    # so deny-list entries written here reach them only through their replay job, and their
    # pending challenges cannot be ended from here.
    reaches_service_state: bool

    @property
    def db(self) -> Database:
        return self.stores.db

    @classmethod
    def from_components(cls, c: Components) -> AdminTools:
        """The tools of a running service (for admin RPCs): its own state, always reachable."""
        return cls(c.clock, c.stores, c.keys, c.audit, c.denylist, c.limiter, c.cleanup, True)

    @property
    def user_access(self) -> UserAccess:
        """Disabling and erasing users (``iam_grpc.core.user_access``) over these tools."""
        ephemeral = self.stores.ephemeral if self.reaches_service_state else None
        return UserAccess(self.db, self.clock, self.audit, self.denylist, ephemeral)

    async def find_user(self, tx: Transaction, who: str) -> User | None:
        """By id (a ULID) or by email address; an erased user is not found."""
        found = await tx.users.get(who) if ULID_RE.match(who) else await tx.users.get_by_email(email_key(who))
        return None if found is None or found.status == "deleted" else found

    async def revoke_user_sessions(self, user: User, reason: str) -> list[str]:
        """Every live session of ``user`` ends (SQL first, then the deny-list and challenges)."""
        now = self.clock.now()
        async with self.db.transaction() as tx:
            ids = await tx.sessions.revoke_all(user.id, reason, now)
            await self.audit.sessions_revoked(tx, user.id, ids, reason)
        await self.denylist.revoke_sessions(ids)
        if self.reaches_service_state:
            await end_session_challenges(self.stores.ephemeral, ids)
        return ids


@asynccontextmanager
async def open_admin(settings: Settings, *, clock: Clock | None = None) -> AsyncIterator[AdminTools]:
    """The tools over the configured stores, built by the service's builders. SQL is opened
    without the serving path's statement time-outs (a cleanup pass may run long), and nothing is
    waited for: a store that does not answer fails the command."""
    clock = clock or SystemClock()
    material = resolve_secrets(settings).material
    metrics = Metrics()  # this command's own counters; nothing scrapes them
    async with AsyncExitStack() as stack:
        db = await stack.enter_async_context(SqlDatabase.from_url(settings.database.url))
        stores = await open_stores(settings, db, clock, stack, serving=False)
        audit = b.build_audit(settings, stores, clock, material, caller="cli")
        risk = b.build_risk(settings, stores, clock, material)
        yield AdminTools(
            clock=clock,
            stores=stores,
            keys=b.build_keys(settings, db, clock, material),
            audit=audit,
            denylist=b.build_denylist(settings, stores, clock, metrics),
            limiter=b.build_limiter(settings, stores, clock, material, metrics, audit, risk),
            cleanup=b.build_cleanup(settings, stores, clock),
            reaches_service_state=stores.shared,
        )


@asynccontextmanager
async def open_outbox(settings: Settings) -> AsyncIterator[Database]:
    """SQL alone: the outbox commands need neither secrets nor the ephemeral store."""
    async with SqlDatabase.from_url(settings.database.url) as db:
        yield db
