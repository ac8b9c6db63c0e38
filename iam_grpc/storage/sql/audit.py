"""Audit events."""

from __future__ import annotations

from sqlalchemy import insert, select

from iam_grpc.storage.records import AuditEvent
from iam_grpc.storage.sql._rows import to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import audit_events

__all__ = ["SqlAuditLog"]

_APPEND = insert(audit_events)  # built once (see users.py)


class SqlAuditLog:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def append(self, event: AuditEvent) -> None:
        await self._c.execute(_APPEND, to_values(event, without=("id",)))

    async def recent(
        self, *, user_id: str | None = None, type_prefix: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        query = select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(audit_events.c.user_id == user_id)
        if type_prefix is not None:
            query = query.where(audit_events.c.type.startswith(type_prefix, autoescape=True))
        return [AuditEvent(**dict(row._mapping)) for row in await self._c.execute(query)]
