"""Push deliveries of events (``event_deliveries``): a webhook's queue, retries and dead letters.

Deliveries are created from the numbered stream (``enqueue_new``): the sink's mark in
``event_marks`` says up to which cursor it has taken events on, and moves in the same transaction
as the rows it creates, so each event becomes exactly one delivery per sink whichever replica
does it. A sink configured for the first time starts at the newest cursor (no backlog of history).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, update

from iam_grpc.storage.records import EventDelivery, EventRecord
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.events import SEQUENCE_MARK, SqlEventLog, read_mark, write_mark
from iam_grpc.storage.sql.tables import event_deliveries

__all__ = ["SqlEventDeliveries"]

_ERROR_MAX = 255
_COLUMNS = tuple(c for c in event_deliveries.c if c.name not in ("claimed_by", "claimed_until"))


def _delivery(row: object) -> EventDelivery:
    return EventDelivery(**dict(row._mapping))  # type: ignore[attr-defined]


class SqlEventDeliveries:
    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._lock = dialect == "mysql"
        self._events = SqlEventLog(connection, dialect)

    async def enqueue_new(self, sink: str, now: datetime, limit: int = 500) -> int:
        """One pending delivery per numbered event after the sink's mark; how many."""
        mark = await read_mark(self._c, f"sink:{sink}", lock=self._lock)
        if mark is None:
            head = await read_mark(self._c, SEQUENCE_MARK) or 0
            await write_mark(self._c, f"sink:{sink}", head, known=None)
            return 0
        new = await self._events.after(mark, limit=limit)
        if not new:
            return 0
        await self._c.execute(
            insert(event_deliveries),
            [
                {
                    "sink": sink,
                    "seq": record.seq,
                    "event_id": record.id,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for record in new
            ],
        )
        await write_mark(self._c, f"sink:{sink}", max(r.seq or 0 for r in new), known=mark)
        return len(new)

    async def claim(
        self, sink: str, now: datetime, worker: str, limit: int, lease: timedelta
    ) -> list[tuple[EventDelivery, EventRecord]]:
        """Due pending deliveries, oldest first, leased to ``worker`` (never to two workers)."""
        claimable = and_(
            event_deliveries.c.sink == sink,
            event_deliveries.c.status == "pending",
            event_deliveries.c.next_attempt_at <= now,
            or_(event_deliveries.c.claimed_until.is_(None), event_deliveries.c.claimed_until < now),
        )
        candidates = (
            select(event_deliveries.c.id)
            .where(claimable)
            .order_by(event_deliveries.c.next_attempt_at, event_deliveries.c.id)
            .limit(limit)
        )
        if self._lock:
            candidates = candidates.with_for_update(skip_locked=True)
        ids = list((await self._c.execute(candidates)).scalars())
        if not ids:
            return []
        until = now + lease
        await self._c.execute(
            update(event_deliveries)
            .where(event_deliveries.c.id.in_(ids), claimable)
            .values(claimed_by=worker, claimed_until=until)
        )
        rows = await self._c.execute(
            select(*_COLUMNS)
            .where(
                event_deliveries.c.id.in_(ids),
                event_deliveries.c.claimed_by == worker,
                event_deliveries.c.claimed_until == until,
            )
            .order_by(event_deliveries.c.seq)
        )
        claimed = [_delivery(row) for row in rows]
        events = await self._events.by_seq([d.seq for d in claimed])
        return [(d, events[d.seq]) for d in claimed if d.seq in events]

    async def delivered(self, delivery_id: int, worker: str, now: datetime) -> bool:
        result = await self._c.execute(
            update(event_deliveries)
            .where(event_deliveries.c.id == delivery_id, event_deliveries.c.claimed_by == worker)
            .values(
                status="delivered",
                delivered_at=now,
                attempts=event_deliveries.c.attempts + 1,
                last_error=None,
                claimed_by=None,
                claimed_until=None,
            )
        )
        return result.rowcount == 1

    async def failed(self, delivery_id: int, worker: str, error: str, retry_at: datetime | None) -> bool:
        """One more failed attempt: retried at ``retry_at``, or dead (None)."""
        values: dict[str, object] = {
            "attempts": event_deliveries.c.attempts + 1,
            "last_error": error[:_ERROR_MAX],
            "claimed_by": None,
            "claimed_until": None,
        }
        if retry_at is None:
            values["status"] = "dead"
        else:
            values["next_attempt_at"] = retry_at
        result = await self._c.execute(
            update(event_deliveries)
            .where(event_deliveries.c.id == delivery_id, event_deliveries.c.claimed_by == worker)
            .values(**values)
        )
        return result.rowcount == 1

    async def release(self, worker: str) -> int:
        result = await self._c.execute(
            update(event_deliveries)
            .where(event_deliveries.c.claimed_by == worker, event_deliveries.c.status == "pending")
            .values(claimed_by=None, claimed_until=None)
        )
        return int(result.rowcount)

    async def list(self, status: str | None = None, limit: int = 100) -> list[EventDelivery]:
        """Deliveries newest first."""
        query = select(*_COLUMNS).order_by(event_deliveries.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(event_deliveries.c.status == status)
        return [_delivery(row) for row in await self._c.execute(query)]

    async def replay(self, now: datetime, delivery_id: int | None = None) -> int:
        """Queue one dead delivery (or every dead one) again with fresh attempts; how many."""
        condition = event_deliveries.c.status == "dead"
        if delivery_id is not None:
            condition = and_(condition, event_deliveries.c.id == delivery_id)
        result = await self._c.execute(
            update(event_deliveries)
            .where(condition)
            .values(status="pending", attempts=0, next_attempt_at=now, last_error=None)
        )
        return int(result.rowcount)
