"""The cleanup job's lock (behaviour.md 1.8): one replica at a time, and a pass that outlived its
lock never releases the lock another replica took since (compare-and-delete), on both backends."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from iam_grpc.core.cleanup import LOCK_KEY
from iam_grpc.testing import running_service
from tests.conftest import Backend

LOCK_TTL = timedelta(minutes=9)


@asynccontextmanager
async def database_held(backend: Backend, data_dir: Path) -> AsyncIterator[None]:
    """Another client holds what the cleanup's first statement needs (SQLite's write lock; MySQL's
    refresh_tokens table), so a pass started now waits until the block ends."""
    if not backend.shared:
        connection = sqlite3.connect(data_dir / "iam.db", isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    engine = create_async_engine(backend.environ["IAM_DATABASE_URL"])
    try:
        async with engine.connect() as connection:
            await connection.execute(text("LOCK TABLES refresh_tokens WRITE"))
            try:
                yield
            finally:
                await connection.execute(text("UNLOCK TABLES"))
    finally:
        await engine.dispose()


async def test_a_pass_that_outlived_its_lock_leaves_the_next_holders_lock_alone(
    own_database: Backend, tmp_path: Path
) -> None:
    """Replica A's pass is held up past its lock; the lock expires and replica B takes it. When A
    finishes it releases nothing of B's: B's lock is still there, and a third pass is skipped."""
    environ = {**own_database.isolated(), "IAM_CLEANUP__INTERVAL": "1h"}
    async with running_service(tmp_path, environ) as iam:
        store = iam.app.components.ephemeral
        async with database_held(own_database, tmp_path):
            first = asyncio.create_task(iam.app.components.cleanup.run())
            for _ in range(100):  # until A holds the lock and waits on the database
                if await store.get(LOCK_KEY) is not None:
                    break
                await asyncio.sleep(0.02)
            held_by_a = await store.get(LOCK_KEY)
            assert held_by_a is not None
            await asyncio.sleep(0.2)
            assert not first.done()
            await store.delete(LOCK_KEY)  # A's lock expired ...
            assert await store.set_if_absent(LOCK_KEY, b"replica B", LOCK_TTL)  # ... and B took it
        counts = await asyncio.wait_for(first, 30)
        assert set(counts) >= {"refresh_tokens", "sessions"}  # A's pass did run
        assert await store.get(LOCK_KEY) == b"replica B"
        assert await iam.app.components.cleanup.run() == {}  # B's lock still keeps others out
