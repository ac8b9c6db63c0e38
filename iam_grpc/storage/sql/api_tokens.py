"""Personal API tokens: rows keyed by id, found by the keyed hash of their secret."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import bindparam, func, insert, or_, select, update

from iam_grpc.storage.records import ApiTokenRecord
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import api_tokens, users

__all__ = ["SqlApiTokenStore"]

_INSERT = insert(api_tokens)
_BY_HASH = select(api_tokens).where(api_tokens.c.secret_hash.in_(bindparam("b_hashes", expanding=True)))


def _live(now: datetime):  # type: ignore[no-untyped-def]
    return (api_tokens.c.revoked_at.is_(None)) & (
        api_tokens.c.expires_at.is_(None) | (api_tokens.c.expires_at > now)
    )


class SqlApiTokenStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def insert(self, token: ApiTokenRecord) -> None:
        await self._c.execute(_INSERT, to_values(token))

    async def get(self, token_id: str) -> ApiTokenRecord | None:
        row = (await self._c.execute(select(api_tokens).where(api_tokens.c.id == token_id))).first()
        return to_record(ApiTokenRecord, row)

    async def by_hash(self, hashes: Sequence[str]) -> ApiTokenRecord | None:
        row = (await self._c.execute(_BY_HASH, {"b_hashes": list(hashes)})).first()
        return to_record(ApiTokenRecord, row)

    async def live_of(self, user_id: str, now: datetime) -> list[ApiTokenRecord]:
        query = (
            select(api_tokens)
            .where(api_tokens.c.user_id == user_id, _live(now))
            .order_by(api_tokens.c.created_at.desc(), api_tokens.c.id.desc())
        )
        return [ApiTokenRecord(**dict(row._mapping)) for row in await self._c.execute(query)]

    async def all_of(self, user_id: str) -> list[ApiTokenRecord]:
        query = select(api_tokens).where(api_tokens.c.user_id == user_id).order_by(api_tokens.c.created_at)
        return [ApiTokenRecord(**dict(row._mapping)) for row in await self._c.execute(query)]

    async def count_live(self, user_id: str, now: datetime) -> int:
        # the user's row locked first (MariaDB; SQLite has one writer): concurrent creations of one
        # user count one after the other, so the limit holds across replicas
        await self._c.execute(select(users.c.id).where(users.c.id == user_id).with_for_update())
        query = (
            select(func.count()).select_from(api_tokens).where(api_tokens.c.user_id == user_id, _live(now))
        )
        return int((await self._c.execute(query)).scalar() or 0)

    async def revoke(self, token_id: str, reason: str, now: datetime) -> bool:
        result = await self._c.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now, revoke_reason=reason)
        )
        return result.rowcount == 1

    async def revoke_all(self, user_id: str, reason: str, now: datetime) -> list[str]:
        """Revoke every unrevoked token of the user; returns their secret hashes."""
        query = select(api_tokens.c.secret_hash).where(
            api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None)
        )
        hashes = [str(h) for h in (await self._c.execute(query)).scalars()]
        if hashes:
            await self._c.execute(
                update(api_tokens)
                .where(api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now, revoke_reason=reason)
            )
        return hashes

    async def replace_secret(
        self, token_id: str, expect_hash: str, prefix: str, secret_hash: str, key_version: int, now: datetime
    ) -> bool:
        result = await self._c.execute(
            update(api_tokens)
            .where(
                api_tokens.c.id == token_id,
                api_tokens.c.secret_hash == expect_hash,
                api_tokens.c.revoked_at.is_(None),
            )
            .values(prefix=prefix, secret_hash=secret_hash, key_version=key_version, rotated_at=now)
        )
        return result.rowcount == 1

    async def record_use(self, used: Mapping[str, datetime]) -> None:
        """last_used_at of many tokens in one statement per token, never moving backwards."""
        for token_id, at in used.items():
            await self._c.execute(
                update(api_tokens)
                .where(
                    api_tokens.c.id == token_id,
                    or_(api_tokens.c.last_used_at.is_(None), api_tokens.c.last_used_at < at),
                )
                .values(last_used_at=at)
            )

    async def delete_of(self, user_id: str) -> list[str]:
        """Remove every token of the user (erasure); returns the hashes of those still live."""
        query = select(api_tokens.c.secret_hash).where(
            api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None)
        )
        hashes = [str(h) for h in (await self._c.execute(query)).scalars()]
        await self._c.execute(api_tokens.delete().where(api_tokens.c.user_id == user_id))
        return hashes
