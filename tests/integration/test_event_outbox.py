"""The event outbox on both engines: written with the change, gone with its rollback, numbered
in commit order, purged after the retention."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from iam_grpc import ids
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.storage.sql.events import emit
from iam_grpc.storage.sql.tables import events

NOW = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)


class Boom(Exception):
    pass


async def rows_of(db: SqlDatabase, user_id: str) -> list[str]:
    async with db.transaction(read_only=True) as tx:
        result = await tx.connection.execute(select(events.c.kind).where(events.c.user_id == user_id))
        return list(result.scalars())


async def sequence_all(db: SqlDatabase) -> None:
    while True:
        async with db.transaction() as tx:
            if not await tx.events.sequence():
                return


async def test_an_event_commits_with_its_change(database: SqlDatabase) -> None:
    """emit() in a transaction that commits leaves the row, with its data."""
    user_id = ids.new_ulid(NOW)
    async with database.transaction() as tx:
        await emit(tx.connection, kind="user.created", at=NOW, user_id=user_id, data={"a": "Zoë"})
    assert await rows_of(database, user_id) == ["user.created"]


async def test_an_event_is_gone_with_a_rolled_back_change(database: SqlDatabase) -> None:
    """An event whose transaction rolls back leaves no row (none describes a change that never was)."""
    user_id = ids.new_ulid(NOW)
    with pytest.raises(Boom):
        async with database.transaction() as tx:
            await tx.events.append("user.created", NOW, user_id=user_id)
            raise Boom()
    assert await rows_of(database, user_id) == []


async def test_sequencing_numbers_every_committed_event_once_in_order(database: SqlDatabase) -> None:
    """The sequencer hands out consecutive cursors after the last one; each event gets one."""
    await sequence_all(database)
    async with database.transaction(read_only=True) as tx:
        start = await tx.events.head()
    user_id = ids.new_ulid(NOW)
    for n in range(5):
        async with database.transaction() as tx:
            await tx.events.append("session.created", NOW, user_id=user_id, data={"n": n})
    await sequence_all(database)
    async with database.transaction(read_only=True) as tx:
        got = [e for e in await tx.events.after(start, limit=1000) if e.user_id == user_id]
        head = await tx.events.head()
    assert [e.data["n"] for e in got] == [0, 1, 2, 3, 4]
    assert [e.seq for e in got] == sorted({e.seq for e in got})
    assert head >= start + 5


async def test_concurrent_sequencers_never_hand_out_a_cursor_twice(database: SqlDatabase) -> None:
    """Two sequencers racing (two replicas) number disjoint sets: no duplicate, no gap."""
    user_id = ids.new_ulid(NOW)
    for n in range(30):
        async with database.transaction() as tx:
            await tx.events.append("session.created", NOW, user_id=user_id, data={"n": n})

    async def run() -> None:
        await sequence_all(database)

    await asyncio.gather(run(), run(), run())
    async with database.transaction(read_only=True) as tx:
        got = [e for e in await tx.events.after(0, limit=100000) if e.user_id == user_id]
    assert len(got) == 30
    assert len({e.seq for e in got}) == 30


async def test_purge_moves_the_purged_mark(database: SqlDatabase) -> None:
    """Events older than the cut-off are deleted and the purged mark passes them."""
    user_id = ids.new_ulid(NOW)
    old = NOW - timedelta(days=400 + secrets.randbelow(100))
    async with database.transaction() as tx:
        await tx.events.append("user.created", old, user_id=user_id)
    await sequence_all(database)
    while True:
        async with database.transaction() as tx:
            if not await tx.events.purge(old + timedelta(seconds=1), 1000):
                break
    assert await rows_of(database, user_id) == []
    async with database.transaction(read_only=True) as tx:
        assert await tx.events.purged_through() > 0
