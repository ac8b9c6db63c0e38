"""Passkeys and linked identities."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, insert, select, update

from iam_grpc.storage.records import IdentityRecord, PasskeyRecord
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import identities, passkeys

__all__ = ["SqlIdentityStore", "SqlPasskeyStore"]


class SqlPasskeyStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def insert(self, passkey: PasskeyRecord) -> None:
        await self._c.execute(insert(passkeys), to_values(passkey))

    async def by_credential(self, credential_hash: str) -> PasskeyRecord | None:
        result = await self._c.execute(select(passkeys).where(passkeys.c.credential_hash == credential_hash))
        return to_record(PasskeyRecord, result.first())

    async def of_user(self, user_id: str) -> list[PasskeyRecord]:
        result = await self._c.execute(
            select(passkeys)
            .where(passkeys.c.user_id == user_id)
            .order_by(passkeys.c.created_at.desc(), passkeys.c.id.desc())
        )
        return [PasskeyRecord(**dict(row._mapping)) for row in result]

    async def count(self, user_id: str) -> int:
        result = await self._c.execute(
            select(func.count()).select_from(passkeys).where(passkeys.c.user_id == user_id)
        )
        return int(result.scalar_one())

    async def used(
        self, passkey_id: str, *, expect_count: int, sign_count: int, backed_up: bool, now: datetime
    ) -> bool:
        result = await self._c.execute(
            update(passkeys)
            .where(passkeys.c.id == passkey_id, passkeys.c.sign_count == expect_count)
            .values(sign_count=sign_count, backed_up=int(backed_up), last_used_at=now)
        )
        return bool(result.rowcount)

    async def delete(self, user_id: str, passkey_id: str) -> bool:
        result = await self._c.execute(
            delete(passkeys).where(passkeys.c.id == passkey_id, passkeys.c.user_id == user_id)
        )
        return bool(result.rowcount)


class SqlIdentityStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def insert(self, identity: IdentityRecord) -> None:
        await self._c.execute(insert(identities), to_values(identity))

    async def by_subject(self, provider: str, subject: str) -> IdentityRecord | None:
        result = await self._c.execute(
            select(identities).where(identities.c.provider == provider, identities.c.subject == subject)
        )
        return to_record(IdentityRecord, result.first())

    async def of_user(self, user_id: str) -> list[IdentityRecord]:
        result = await self._c.execute(
            select(identities).where(identities.c.user_id == user_id).order_by(identities.c.provider)
        )
        return [IdentityRecord(**dict(row._mapping)) for row in result]

    async def delete(self, user_id: str, provider: str) -> bool:
        result = await self._c.execute(
            delete(identities).where(identities.c.user_id == user_id, identities.c.provider == provider)
        )
        return bool(result.rowcount)
