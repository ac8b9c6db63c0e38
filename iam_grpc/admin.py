"""Operator actions behind the CLI (keys, roles, users, cleanup): the same core
objects the server uses, opened against the configured stores. Every change
writes an audit event with ``caller = "cli"``.

Revocations are recorded in SQL first (the authority), then written to the
shared deny-list cache. In embedded mode that cache lives in the serving
process's memory, out of the CLI's reach: the server's replay job applies them
within ``tokens.denylist_replay``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from iam_grpc.clock import SystemClock
from iam_grpc.config import Settings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import end_session_challenges
from iam_grpc.core.cleanup import Cleanup, CleanupPolicy
from iam_grpc.core.keys import KeyRing
from iam_grpc.core.ratelimit import email_key
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.ids import ULID_RE
from iam_grpc.metrics import Metrics
from iam_grpc.secret_material import resolve_secrets
from iam_grpc.storage.memory import MemoryEphemeral
from iam_grpc.storage.ports import Ephemeral, Transaction
from iam_grpc.storage.records import User
from iam_grpc.storage.sql.database import SqlDatabase

__all__ = ["Admin", "admin_tools"]


@dataclass
class Admin:
    settings: Settings
    db: SqlDatabase
    keys: KeyRing
    audit: AuditTrail
    denylist: DenyList
    cleanup: Cleanup
    clock: SystemClock
    shared_state: bool  # False: the deny-list writes below reach no running server
    ephemeral: Ephemeral

    async def find_user(self, tx: Transaction, who: str) -> User | None:
        if ULID_RE.match(who):
            return await tx.users.get(who)
        return await tx.users.get_by_email(email_key(who))

    async def revoke_user_sessions(self, user: User, reason: str) -> list[str]:
        now = self.clock.now()
        async with self.db.transaction() as tx:
            ids = await tx.sessions.revoke_all(user.id, reason, now)
            await self.audit.sessions_revoked(tx, user.id, ids, reason)
        await self.denylist.revoke_sessions(ids)
        if self.shared_state:  # embedded mode: the running service's challenges are not reachable
            await end_session_challenges(self.ephemeral, ids)
        return ids


@asynccontextmanager
async def admin_tools(settings: Settings) -> AsyncIterator[Admin]:
    clock = SystemClock()
    material = resolve_secrets(settings).material
    db = SqlDatabase.from_url(settings.database.url)
    ephemeral: Ephemeral
    redis_store = None
    if settings.redis.url:
        from iam_grpc.storage.redis import RedisEphemeral

        redis_store = RedisEphemeral(settings.redis.url, prefix=settings.redis.key_prefix)
        ephemeral = redis_store
    else:
        ephemeral = MemoryEphemeral(1000)  # nothing reads it: see the module docstring
    tokens, keys = settings.tokens, settings.keys
    ring = KeyRing(
        db,
        material,
        clock,
        algorithm=tokens.algorithm,
        publish_ahead=keys.publish_ahead,
        retire_after=tokens.access_ttl + tokens.leeway + keys.jwks_max_age,
        rotation_interval=keys.rotation_interval,
    )
    try:
        await ring.reload()
        yield Admin(
            settings=settings,
            db=db,
            keys=ring,
            audit=AuditTrail(db, clock, material, caller="cli"),
            denylist=DenyList(
                ephemeral,
                db,
                clock,
                Metrics(),
                access_ttl=tokens.access_ttl,
                leeway=tokens.leeway,
                fallback="sql",
                server_id=(lambda: redis_store.server_id) if redis_store is not None else None,
            ),
            cleanup=Cleanup(
                db,
                ephemeral,
                clock,
                CleanupPolicy(
                    reuse_memory=settings.refresh.reuse_memory,
                    audit_retention=settings.audit.retention,
                    batch=settings.cleanup.batch,
                ),
            ),
            clock=clock,
            shared_state=redis_store is not None,
            ephemeral=ephemeral,
        )
    finally:
        if redis_store is not None:
            await redis_store.close()
        await db.close()
