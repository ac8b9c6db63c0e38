"""The email outbox (behaviour.md 7.3): list rows, send dead notices again."""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.admin.errors import Invalid
from iam_grpc.clock import Clock
from iam_grpc.storage.ports import Database
from iam_grpc.storage.records import OutboxMessage

__all__ = ["Retried", "list_outbox", "retry_outbox"]

_ALL_DEAD = 10_000


@dataclass(frozen=True, slots=True)
class Retried:
    revived: int
    considered: int


async def list_outbox(db: Database, status: str | None, limit: int) -> list[OutboxMessage]:
    """Rows newest first (``status``: pending, sent, expired, suppressed or dead)."""
    async with db.transaction() as tx:
        return list(await tx.outbox.list(status, limit))


async def retry_outbox(db: Database, clock: Clock, *, message_id: int | None, dead: bool) -> Retried:
    """Queue one row (``message_id``) or every dead row (``dead``) again; rows whose secrets were
    wiped cannot be resent."""
    if (message_id is None) == (not dead):
        raise Invalid("give one row id or --dead")
    now = clock.now()
    async with db.transaction() as tx:
        ids = (
            [message_id]
            if message_id is not None
            else [r.id for r in await tx.outbox.list("dead", _ALL_DEAD)]
        )
        revived = [i for i in ids if i is not None and await tx.outbox.retry(i, now)]
    return Retried(len(revived), len(ids))
