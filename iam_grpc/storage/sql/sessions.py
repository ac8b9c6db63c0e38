"""Sessions and their refresh-token chains."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import exists, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from iam_grpc.storage.records import RefreshToken, SessionRecord
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.tables import refresh_tokens, sessions

__all__ = ["SqlSessionStore"]


class SqlSessionStore:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def insert(self, session: SessionRecord) -> None:
        await self._c.execute(insert(sessions).values(**to_values(session)))

    async def get(self, session_id: str) -> SessionRecord | None:
        row = (await self._c.execute(select(sessions).where(sessions.c.id == session_id))).first()
        return to_record(SessionRecord, row)

    async def list_live(self, user_id: str, now: datetime) -> list[SessionRecord]:
        active_token = exists().where(
            refresh_tokens.c.session_id == sessions.c.id,
            refresh_tokens.c.state == "active",
            refresh_tokens.c.expires_at > now,
        )
        query = (
            select(sessions)
            .where(
                sessions.c.user_id == user_id,
                sessions.c.revoked_at.is_(None),
                sessions.c.absolute_expires_at > now,
                active_token,
            )
            .order_by(sessions.c.last_refreshed_at.desc(), sessions.c.id.desc())
        )
        return [SessionRecord(**dict(row._mapping)) for row in await self._c.execute(query)]

    async def revoke(self, session_id: str, reason: str, now: datetime) -> bool:
        result = await self._c.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=now, revoke_reason=reason)
        )
        await self._c.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.session_id == session_id, refresh_tokens.c.state != "revoked")
            .values(state="revoked")
        )
        return result.rowcount == 1

    async def revoked_since(self, since: datetime) -> list[str]:
        rows = await self._c.execute(select(sessions.c.id).where(sessions.c.revoked_at >= since))
        return list(rows.scalars())

    async def insert_token(self, token: RefreshToken) -> int:
        result = await self._c.execute(insert(refresh_tokens).values(**to_values(token, without=("id",))))
        key = result.inserted_primary_key
        if key is None or key[0] is None:
            raise RuntimeError("the database assigned no id")
        return int(key[0])

    async def token_by_hash(self, token_hash: str) -> RefreshToken | None:
        row = (
            await self._c.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash))
        ).first()
        return to_record(RefreshToken, row)

    async def tokens_of(self, session_id: str) -> list[RefreshToken]:
        rows = await self._c.execute(
            select(refresh_tokens)
            .where(refresh_tokens.c.session_id == session_id)
            .order_by(refresh_tokens.c.generation, refresh_tokens.c.id)
        )
        return [RefreshToken(**dict(row._mapping)) for row in rows]

    async def mark_rotated(self, token_id: int, successor_id: int | None, now: datetime) -> bool:
        result = await self._c.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.id == token_id, refresh_tokens.c.state == "active")
            .values(state="rotated", used_at=now, successor_id=successor_id)
        )
        return result.rowcount == 1
