"""The durable email outbox (behaviour.md 7.3)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from iam_grpc.storage.records import OutboxMessage
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import email_outbox

__all__ = ["SqlOutbox"]

_ERROR_MAX = 255
# Kinds whose rows never carry sealed secrets: a dead one can be sent again as it was.
RETRYABLE_KINDS = (
    "email_change_requested",
    "email_in_use",
    "email_changed",
    "new_device",
    "password_changed",
    "security_alert",
)


class SqlOutbox:
    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._dialect = dialect

    async def enqueue(self, message: OutboxMessage) -> int | None:
        statement = insert(email_outbox).values(**to_values(message, without=("id",)))
        if message.dedupe_key is None:
            result = await self._c.execute(statement)
        else:
            # A savepoint keeps the caller's transaction usable when the dedupe key is taken.
            try:
                async with self._c.begin_nested():
                    result = await self._c.execute(statement)
            except IntegrityError:
                return None
        key = result.inserted_primary_key
        if key is None or key[0] is None:
            raise RuntimeError("the database assigned no id")
        return int(key[0])

    async def seal(self, message_id: int, sealed_params: bytes) -> None:
        await self._c.execute(
            update(email_outbox).where(email_outbox.c.id == message_id).values(sealed_params=sealed_params)
        )

    async def get(self, message_id: int) -> OutboxMessage | None:
        row = (await self._c.execute(select(email_outbox).where(email_outbox.c.id == message_id))).first()
        return to_record(OutboxMessage, row)

    async def claim(self, now: datetime, worker: str, limit: int, lease: timedelta) -> list[OutboxMessage]:
        claimable = and_(
            email_outbox.c.status == "pending",
            email_outbox.c.next_attempt_at <= now,
            or_(email_outbox.c.claimed_until.is_(None), email_outbox.c.claimed_until < now),
        )
        candidates = (
            select(email_outbox.c.id)
            .where(claimable)
            .order_by(email_outbox.c.priority, email_outbox.c.next_attempt_at, email_outbox.c.id)
            .limit(limit)
        )
        if self._dialect == "mysql":
            candidates = candidates.with_for_update(skip_locked=True)
        ids = list((await self._c.execute(candidates)).scalars())
        if not ids:
            return []
        until = now + lease
        # The claim condition is repeated, so a row claimed meanwhile by another
        # worker is never taken twice, even without row locks (SQLite).
        await self._c.execute(
            update(email_outbox)
            .where(email_outbox.c.id.in_(ids), claimable)
            .values(claimed_by=worker, claimed_until=until)
        )
        rows = await self._c.execute(
            select(email_outbox)
            .where(
                email_outbox.c.id.in_(ids),
                email_outbox.c.claimed_by == worker,
                email_outbox.c.claimed_until == until,
            )
            .order_by(email_outbox.c.priority, email_outbox.c.next_attempt_at, email_outbox.c.id)
        )
        return [OutboxMessage(**dict(row._mapping)) for row in rows]

    def _mine(self, message_id: int, worker: str) -> ColumnElement[bool]:
        return and_(
            email_outbox.c.id == message_id,
            email_outbox.c.claimed_by == worker,
            email_outbox.c.status == "pending",
        )

    async def mark_sent(self, message_id: int, worker: str, now: datetime, provider_id: str | None) -> bool:
        result = await self._c.execute(
            update(email_outbox)
            .where(self._mine(message_id, worker))
            .values(
                status="sent",
                sent_at=now,
                provider_message_id=provider_id,
                sealed_params=None,
                claimed_by=None,
                claimed_until=None,
                attempts=email_outbox.c.attempts + 1,
            )
        )
        return result.rowcount == 1

    async def mark_failed(
        self, message_id: int, worker: str, error: str, *, retry_at: datetime | None, now: datetime
    ) -> bool:
        values: dict[str, object] = {
            "attempts": email_outbox.c.attempts + 1,
            "last_error": error[:_ERROR_MAX],
            "claimed_by": None,
            "claimed_until": None,
        }
        if retry_at is None:
            values.update(status="dead", sealed_params=None)
        else:
            values["next_attempt_at"] = retry_at
        result = await self._c.execute(
            update(email_outbox).where(self._mine(message_id, worker)).values(**values)
        )
        return result.rowcount == 1

    async def mark_expired(self, message_id: int, worker: str) -> bool:
        result = await self._c.execute(
            update(email_outbox)
            .where(self._mine(message_id, worker))
            .values(status="expired", sealed_params=None, claimed_by=None, claimed_until=None)
        )
        return result.rowcount == 1

    async def release(self, worker: str) -> int:
        result = await self._c.execute(
            update(email_outbox)
            .where(email_outbox.c.claimed_by == worker, email_outbox.c.status == "pending")
            .values(claimed_by=None, claimed_until=None)
        )
        return int(result.rowcount)

    async def retry(self, message_id: int, now: datetime) -> bool:
        result = await self._c.execute(
            update(email_outbox)
            .where(
                email_outbox.c.id == message_id,
                email_outbox.c.status == "dead",
                email_outbox.c.not_after > now,
                email_outbox.c.sealed_params.is_(None),
                email_outbox.c.kind.in_(RETRYABLE_KINDS),
            )
            .values(status="pending", attempts=0, next_attempt_at=now, last_error=None)
        )
        return result.rowcount == 1

    async def list(self, status: str | None = None, limit: int = 100) -> list[OutboxMessage]:
        query = select(email_outbox).order_by(email_outbox.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(email_outbox.c.status == status)
        return [OutboxMessage(**dict(row._mapping)) for row in await self._c.execute(query)]
