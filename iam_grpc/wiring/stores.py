"""Opening the state adapters (behaviour.md 11.4 steps 3 and 5): SQL with its migrations, then
the ephemeral store, each entered into the caller's exit stack, which closes them.

SQL is the authority for everything that must survive; the ephemeral store (Redis, or process
memory in embedded mode) holds counters, single-use marks, challenges and caches.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iam_grpc.clock import Clock
from iam_grpc.config import Settings
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore
from iam_grpc.storage.ports import Ephemeral, LimiterStore
from iam_grpc.storage.sql import schema
from iam_grpc.storage.sql.database import ACCESS_DENIED_CODES, SqlDatabase
from iam_grpc.wiring.errors import StartupError

if TYPE_CHECKING:
    from iam_grpc.storage.redis import RedisEphemeral

__all__ = ["Stores", "open_database", "open_stores"]

log = component_logger("iam.app")


@dataclass(frozen=True, slots=True)
class Stores:
    """The opened state adapters every builder draws on."""

    db: SqlDatabase
    ephemeral: Ephemeral  # Redis when configured, else process memory
    redis: RedisEphemeral | None  # the shared store (its breaker, its server's run id)
    limits: LimiterStore  # the limiter's view of the ephemeral store
    fallback_limits: LimiterStore | None  # process memory when Redis fails (on_store_failure = local)

    @property
    def shared(self) -> bool:
        """Whether other processes see this ephemeral state (Redis), or only this one does."""
        return self.redis is not None


async def open_database(
    settings: Settings, stack: AsyncExitStack, metrics: Metrics, *, migrate: bool
) -> SqlDatabase:
    """Step 3: connect (retrying for ``database.startup_wait``), then migrate to the code's schema
    or refuse a database at another revision."""
    s = settings.database
    db = await stack.enter_async_context(
        SqlDatabase.from_url(
            s.url,
            pool_size=s.pool_size,
            max_overflow=s.max_overflow,
            pool_recycle=s.pool_recycle,
            pool_pre_ping=s.pool_pre_ping,
            connect_timeout=s.connect_timeout,
            statement_timeout=s.statement_timeout,
            on_statement=metrics.sql_statements.inc,
        )
    )
    await _wait_for_sql(db, settings)
    await _ensure_schema(db, migrate=migrate)
    return db


async def _wait_for_sql(db: SqlDatabase, settings: Settings) -> None:
    deadline = time.monotonic() + settings.database.startup_wait.total_seconds()
    delay = 0.25
    while True:
        try:
            await db.ping()
            return
        except BackendUnavailable as exc:
            cause = exc.cause()
            if cause.get("driver_code") in ACCESS_DENIED_CODES:
                raise StartupError(
                    f"database.url (IAM_DATABASE_URL): access denied or unknown database "
                    f"(MySQL error {cause['driver_code']}); check user, password and database name"
                ) from None
            if time.monotonic() >= deadline:
                raise StartupError(
                    "database.url: the database did not answer within database.startup_wait"
                ) from None
            log.bind(**cause).warning("database not reachable yet; retrying")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _ensure_schema(db: SqlDatabase, *, migrate: bool) -> None:
    head = schema.HEAD
    current = await schema.database_revision(db.engine)
    if current != head and migrate:
        from iam_grpc.storage.sql import migrate as migrations  # Alembic only when there is work for it

        try:
            await migrations.upgrade(db.engine)
        except migrations.MigrationLockTimeout:
            raise StartupError("another process held the migration lock for 60 s") from None
        current = await schema.database_revision(db.engine)
    if current != head:
        raise StartupError(
            f"database schema is at {current or 'empty'}, this version needs {head}: "
            "run `iam-grpc migrate` (or serve with --migrate)"
        )


async def open_stores(
    settings: Settings, db: SqlDatabase, clock: Clock, stack: AsyncExitStack, *, serving: bool = True
) -> Stores:
    """Step 5's stores: Redis when configured, else process memory. For serving, Redis is waited
    for (up to ``database.startup_wait``) and the limiter gets its local fallback; an operator
    command (``serving=False``) wants neither: it fails at once, and reads only shared state."""
    s = settings
    if not s.redis.url:
        memory = await stack.enter_async_context(MemoryEphemeral(s.ephemeral.memory_max_keys, clock=clock))
        return Stores(db, memory, None, MemoryLimiterStore(memory), None)
    from iam_grpc.storage.redis import RedisEphemeral, RedisLimiterStore  # redis-py only when configured

    redis = await stack.enter_async_context(
        RedisEphemeral(
            s.redis.url,
            prefix=s.redis.key_prefix,
            socket_timeout=s.redis.socket_timeout,
            connect_timeout=s.redis.connect_timeout,
        )
    )
    if serving:
        await _wait_for_redis(redis, settings)
    fallback: LimiterStore | None = None
    if serving and s.ratelimit.on_store_failure == "local":
        local = await stack.enter_async_context(MemoryEphemeral(s.ephemeral.memory_max_keys, clock=clock))
        fallback = MemoryLimiterStore(local)
    return Stores(db, redis, redis, RedisLimiterStore(redis), fallback)


async def _wait_for_redis(redis: RedisEphemeral, settings: Settings) -> None:
    deadline = time.monotonic() + settings.database.startup_wait.total_seconds()
    while True:
        try:
            await redis.ping()
            return
        except BackendUnavailable as exc:
            if time.monotonic() >= deadline:
                raise StartupError("redis.url: Redis did not answer within database.startup_wait") from None
            log.bind(**exc.cause()).warning("redis not reachable yet; retrying")
            await asyncio.sleep(0.5)
