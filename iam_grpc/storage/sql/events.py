"""The event outbox (api.md EventService) on SQL.

A store writes an event in its own transaction with :func:`emit`::

    async with db.transaction() as tx:
        await tx.users.set_status(user_id, "disabled", now)
        await emit(tx.connection, kind="user.disabled", at=now, user_id=user_id)

or, from core code that only knows the port, ``await tx.events.append("user.disabled", now,
user_id=user_id)``. The row commits with the change or not at all: no event is lost, and none
describes a change that rolled back. It carries no cursor yet; :meth:`SqlEventLog.sequence`
numbers committed rows later (one sequencer at a time, serialised on the ``sequence`` mark's
row), so a watcher that has seen cursor ``n`` can never later find a committed event below ``n``
(auto-increment ids are handed out at INSERT, so on MariaDB they become visible out of order).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, insert, select, update

from iam_grpc.ids import new_ulid
from iam_grpc.storage.records import EventRecord
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import event_deliveries, event_marks, events

__all__ = ["PURGED_MARK", "SEQUENCE_MARK", "SqlEventLog", "emit"]

SEQUENCE_MARK = "sequence"
PURGED_MARK = "purged"

_INSERT = insert(events)
_COLUMNS = (
    events.c.seq,
    events.c.id,
    events.c.kind,
    events.c.at,
    events.c.user_id,
    events.c.session_id,
    events.c.data,
)
_NUMBER = update(events).where(events.c.pos == bindparam("b_pos")).values(seq=bindparam("b_seq"))


async def emit(
    conn: SqlConnection,
    *,
    kind: str,
    at: datetime,
    user_id: str | None = None,
    session_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Write one event in the caller's open transaction (see the module docstring)."""
    await conn.execute(
        _INSERT,
        {
            "id": new_ulid(at),
            "kind": kind,
            "at": at,
            "user_id": user_id,
            "session_id": session_id,
            "data": dict(data or {}),
        },
    )


async def read_mark(conn: SqlConnection, name: str, *, lock: bool = False) -> int | None:
    query = select(event_marks.c.value).where(event_marks.c.name == name)
    if lock:
        query = query.with_for_update()  # MySQL; SQLite's BEGIN IMMEDIATE serialises anyway
    value = (await conn.execute(query)).scalar()
    return None if value is None else int(value)


async def write_mark(conn: SqlConnection, name: str, value: int, *, known: int | None) -> None:
    if known is None:
        await conn.execute(insert(event_marks).values(name=name, value=value))
    else:
        await conn.execute(update(event_marks).where(event_marks.c.name == name).values(value=value))


class SqlEventLog:
    """The event outbox's statements, bound to one transaction."""

    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._lock = dialect == "mysql"

    async def append(
        self,
        kind: str,
        at: datetime,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        await emit(self._c, kind=kind, at=at, user_id=user_id, session_id=session_id, data=data)

    async def sequence(self, limit: int = 500) -> int:
        """Give the oldest unnumbered committed events the next cursors; returns how many."""
        last = await read_mark(self._c, SEQUENCE_MARK, lock=self._lock)
        waiting = list(
            (
                await self._c.execute(
                    select(events.c.pos).where(events.c.seq.is_(None)).order_by(events.c.pos).limit(limit)
                )
            ).scalars()
        )
        if not waiting:
            return 0
        start = last or 0
        await self._c.execute(
            _NUMBER, [{"b_pos": pos, "b_seq": start + i} for i, pos in enumerate(waiting, 1)]
        )
        await write_mark(self._c, SEQUENCE_MARK, start + len(waiting), known=last)
        return len(waiting)

    async def waiting(self) -> bool:
        """Whether a committed event waits for its cursor."""
        query = select(events.c.pos).where(events.c.seq.is_(None)).limit(1)
        return (await self._c.execute(query)).first() is not None

    async def head(self) -> int:
        """The newest cursor handed out (0 before the first event)."""
        return await read_mark(self._c, SEQUENCE_MARK) or 0

    async def purged_through(self) -> int:
        """Every cursor up to this one names an event the retention deleted."""
        return await read_mark(self._c, PURGED_MARK) or 0

    async def after(self, seq: int, *, kinds: Sequence[str] = (), limit: int = 500) -> list[EventRecord]:
        """Numbered events after ``seq``, oldest first."""
        query = select(*_COLUMNS).where(events.c.seq > seq).order_by(events.c.seq).limit(limit)
        if kinds:
            query = query.where(events.c.kind.in_(list(kinds)))
        return [EventRecord(**dict(row._mapping)) for row in await self._c.execute(query)]

    async def by_seq(self, seqs: Sequence[int]) -> dict[int, EventRecord]:
        if not seqs:
            return {}
        rows = await self._c.execute(select(*_COLUMNS).where(events.c.seq.in_(list(seqs))))
        return {int(row.seq): EventRecord(**dict(row._mapping)) for row in rows}

    async def purge(self, before: datetime, batch: int) -> int:
        """Delete up to ``batch`` numbered events older than ``before`` (keeping those a webhook
        delivery still waits for or gave up on) and move the purged mark past them."""
        undelivered = exists().where(
            event_deliveries.c.seq == events.c.seq, event_deliveries.c.status != "delivered"
        )
        seqs = list(
            (
                await self._c.execute(
                    select(events.c.seq)
                    .where(events.c.at < before, events.c.seq.is_not(None), ~undelivered)
                    .order_by(events.c.seq)
                    .limit(batch)
                )
            ).scalars()
        )
        if not seqs:
            return 0
        await self._c.execute(delete(events).where(events.c.seq.in_(seqs)))
        await self._c.execute(
            delete(event_deliveries).where(
                event_deliveries.c.seq.in_(seqs), event_deliveries.c.status == "delivered"
            )
        )
        known = await read_mark(self._c, PURGED_MARK, lock=self._lock)
        await write_mark(self._c, PURGED_MARK, max(known or 0, max(seqs)), known=known)
        return len(seqs)

    async def count(self) -> int:
        return int((await self._c.execute(select(func.count()).select_from(events))).scalar() or 0)
