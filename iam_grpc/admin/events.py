"""Webhook deliveries of events: list them, queue dead ones again (``iam-grpc events
deliveries``)."""

from __future__ import annotations

from iam_grpc.admin.errors import Invalid
from iam_grpc.clock import Clock
from iam_grpc.storage.records import EventDelivery
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.storage.sql.deliveries import SqlEventDeliveries

__all__ = ["DELIVERY_STATUSES", "list_deliveries", "replay_deliveries"]

DELIVERY_STATUSES = ("pending", "delivered", "dead")


async def list_deliveries(db: SqlDatabase, status: str | None, limit: int) -> list[EventDelivery]:
    """Deliveries newest first (``status``: pending, delivered or dead)."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise Invalid("status must be pending, delivered or dead")
    async with db.transaction(read_only=True) as tx:
        return await SqlEventDeliveries(tx.connection, db.dialect).list(status, limit)


async def replay_deliveries(db: SqlDatabase, clock: Clock, *, delivery_id: int | None, dead: bool) -> int:
    """Queue one dead delivery (``delivery_id``) or every dead one (``dead``) again with fresh
    attempts; how many."""
    if (delivery_id is None) == (not dead):
        raise Invalid("give one delivery id or --dead")
    async with db.transaction() as tx:
        return await SqlEventDeliveries(tx.connection, db.dialect).replay(clock.now(), delivery_id)
