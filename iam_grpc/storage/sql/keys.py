"""Signing keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update

from iam_grpc.storage.records import SigningKey
from iam_grpc.storage.sql._rows import to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import signing_keys

__all__ = ["SqlKeyStore"]


class SqlKeyStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def insert(self, key: SigningKey) -> None:
        await self._c.execute(insert(signing_keys).values(**to_values(key)))

    async def all(self) -> list[SigningKey]:
        rows = await self._c.execute(
            select(signing_keys).order_by(signing_keys.c.activate_at, signing_keys.c.kid)
        )
        return [SigningKey(**dict(row._mapping)) for row in rows]

    async def retire(
        self,
        kid: str,
        *,
        deactivate_at: datetime | None = None,
        unpublish_at: datetime | None = None,
        destroy_at: datetime | None = None,
    ) -> bool:
        values: dict[str, object] = {}
        if deactivate_at is not None:
            values["deactivate_at"] = deactivate_at
        if unpublish_at is not None:
            values["unpublish_at"] = unpublish_at
        if destroy_at is not None:
            values["destroyed_at"] = destroy_at
            values["private_key_enc"] = None
        if not values:
            return False
        result = await self._c.execute(update(signing_keys).where(signing_keys.c.kid == kid).values(**values))
        return result.rowcount == 1
