"""Revocations of single access tokens (``jti``) and signing keys (``kid``): the SQL record the
deny-list cache is rebuilt from and checked against when the cache cannot be trusted."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import revocations

__all__ = ["SqlRevocationStore"]


class SqlRevocationStore:
    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._dialect = dialect

    async def add(self, kind: str, values: Sequence[str], now: datetime, until: datetime) -> None:
        """Record ``values`` as revoked until ``until``; a value revoked again keeps one row, with
        the later expiry."""
        rows = [
            {"kind": kind, "value": v, "revoked_at": now, "expires_at": until} for v in dict.fromkeys(values)
        ]
        if not rows:
            return
        if self._dialect == "mysql":
            upsert = mysql_insert(revocations)
            await self._c.execute(
                upsert.on_duplicate_key_update(
                    expires_at=upsert.inserted.expires_at, revoked_at=upsert.inserted.revoked_at
                ),
                rows,
            )
        else:
            upsert_lite = sqlite_insert(revocations)
            await self._c.execute(
                upsert_lite.on_conflict_do_update(
                    index_elements=["kind", "value"],
                    set_={
                        "expires_at": upsert_lite.excluded.expires_at,
                        "revoked_at": upsert_lite.excluded.revoked_at,
                    },
                ),
                rows,
            )

    async def find(self, wanted: Sequence[tuple[str, str]], now: datetime) -> set[tuple[str, str]]:
        """Which of the (kind, value) pairs are revoked now."""
        if not wanted:
            return set()
        query = select(revocations.c.kind, revocations.c.value).where(
            revocations.c.expires_at > now,
            or_(*(and_(revocations.c.kind == kind, revocations.c.value == value) for kind, value in wanted)),
        )
        return {(row.kind, row.value) for row in await self._c.execute(query)}

    async def active(self, now: datetime) -> list[tuple[str, str]]:
        """Every (kind, value) revoked and not yet expired, oldest first."""
        query = (
            select(revocations.c.kind, revocations.c.value)
            .where(revocations.c.expires_at > now)
            .order_by(revocations.c.id)
        )
        return [(row.kind, row.value) for row in await self._c.execute(query)]
