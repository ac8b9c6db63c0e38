"""Sessions and their refresh-token chains."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, select, update

from iam_grpc.storage.records import RefreshToken, SessionRecord, TokenContext, User, UserDevice
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import refresh_tokens, roles, sessions, user_devices, user_roles, users

__all__ = ["SqlSessionStore"]


# Hot-path statements are built once: constructing a statement costs about as much as running it.
# One row per role of the user (one row without roles): an aggregate such as GROUP_CONCAT would
# be cut silently at the server's group_concat_max_len (1024 bytes by default on MySQL 8, less
# than 32 roles of 64 characters).
_TOKEN_WITH_CONTEXT = (
    select(
        *(c.label(f"t_{c.name}") for c in refresh_tokens.c),
        *(c.label(f"s_{c.name}") for c in sessions.c),
        *(c.label(f"u_{c.name}") for c in users.c),
        *(c.label(f"l_{c.name}") for c in user_devices.c),
        roles.c.name.label("role_name"),
    )
    .select_from(
        refresh_tokens.join(sessions, sessions.c.id == refresh_tokens.c.session_id)
        .join(users, users.c.id == sessions.c.user_id)
        .outerjoin(
            user_devices,
            and_(
                user_devices.c.user_id == sessions.c.user_id, user_devices.c.device_id == sessions.c.device_id
            ),
        )
        .outerjoin(user_roles, user_roles.c.user_id == users.c.id)
        .outerjoin(roles, roles.c.id == user_roles.c.role_id)
    )
    .where(refresh_tokens.c.token_hash == bindparam("token_hash"))
)
# label in _TOKEN_WITH_CONTEXT -> field of its record, per record
_CONTEXT_PARTS = {
    prefix: tuple((f"{prefix}{c.name}", c.name) for c in table.c)
    for prefix, table in (("t_", refresh_tokens), ("s_", sessions), ("u_", users), ("l_", user_devices))
}
_INSERT_TOKEN = insert(refresh_tokens)
_INSERT_SESSION = insert(sessions)
_SESSION = select(sessions).where(sessions.c.id == bindparam("b_id"))
_LIVE = (
    select(sessions)
    .where(
        sessions.c.user_id == bindparam("b_user"),
        sessions.c.revoked_at.is_(None),
        sessions.c.absolute_expires_at > bindparam("b_now"),
        exists().where(
            refresh_tokens.c.session_id == sessions.c.id,
            refresh_tokens.c.state == "active",
            refresh_tokens.c.expires_at > bindparam("b_now"),
        ),
    )
    .order_by(sessions.c.last_refreshed_at.desc(), sessions.c.id.desc())
)
# Rotations are the tokens that succeeded another: generation 0 was issued at sign-in.
_RECENT_ROTATIONS = (
    select(func.count())
    .select_from(refresh_tokens)
    .where(
        refresh_tokens.c.session_id == bindparam("b_id"),
        refresh_tokens.c.created_at >= bindparam("b_since"),
        refresh_tokens.c.generation > 0,
    )
)
_MARK_ROTATED = (
    update(refresh_tokens)
    .where(refresh_tokens.c.id == bindparam("token_id"), refresh_tokens.c.state == "active")
    .values(state="rotated", used_at=bindparam("used_at"), successor_id=bindparam("successor"))
)
_TOUCH = (
    update(sessions)
    .where(sessions.c.id == bindparam("session_id"))
    .values(
        last_refreshed_at=bindparam("now"),
        last_ip=bindparam("ip"),
        last_browser=bindparam("browser"),
        last_os=bindparam("os"),
        last_country=bindparam("country"),
        last_region=bindparam("region"),
        last_city=bindparam("city"),
    )
)


class SqlSessionStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def insert(self, session: SessionRecord) -> None:
        await self._c.execute(_INSERT_SESSION, to_values(session))

    async def get(self, session_id: str) -> SessionRecord | None:
        row = (await self._c.execute(_SESSION, {"b_id": session_id})).first()
        return to_record(SessionRecord, row)

    async def list_live(self, user_id: str, now: datetime) -> list[SessionRecord]:
        rows = await self._c.execute(_LIVE, {"b_user": user_id, "b_now": now})
        return [SessionRecord(**dict(row._mapping)) for row in rows]

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

    async def revoke_all(
        self, user_id: str, reason: str, now: datetime, *, keep: str | None = None
    ) -> list[str]:
        condition = and_(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
        if keep is not None:
            condition = and_(condition, sessions.c.id != keep)
        ids = list((await self._c.execute(select(sessions.c.id).where(condition))).scalars())
        for session_id in ids:
            await self.revoke(session_id, reason, now)
        return ids

    async def touch(
        self,
        session_id: str,
        now: datetime,
        *,
        ip: str,
        browser: str | None = None,
        os: str | None = None,
        country: str | None = None,
        region: str | None = None,
        city: str | None = None,
    ) -> None:
        await self._c.execute(
            _TOUCH,
            {
                "session_id": session_id,
                "now": now,
                "ip": ip,
                "browser": browser,
                "os": os,
                "country": country,
                "region": region,
                "city": city,
            },
        )

    async def end(self, session_id: str, reason: str, now: datetime) -> bool:
        return await self.revoke(session_id, reason, now)

    async def rebind(self, session_id: str, device_id: str) -> None:
        await self._c.execute(update(sessions).where(sessions.c.id == session_id).values(device_id=device_id))

    async def set_auth(self, session_id: str, now: datetime, *, mfa: bool = False) -> None:
        values: dict[str, object] = {"auth_at": now}
        if mfa:
            values["mfa_at"] = now
        await self._c.execute(update(sessions).where(sessions.c.id == session_id).values(**values))

    async def revoked_since(self, since: datetime) -> list[str]:
        rows = await self._c.execute(select(sessions.c.id).where(sessions.c.revoked_at >= since))
        return list(rows.scalars())

    async def insert_token(self, token: RefreshToken) -> int:
        result = await self._c.execute(_INSERT_TOKEN, to_values(token, without=("id",)))
        key = result.inserted_primary_key
        if key is None or key[0] is None:
            raise RuntimeError("the database assigned no id")
        return int(key[0])

    async def token_with_context(self, token_hash: str) -> TokenContext | None:
        rows = (await self._c.execute(_TOKEN_WITH_CONTEXT, {"token_hash": token_hash})).all()
        if not rows:
            return None
        values = rows[0]._mapping

        def part(prefix: str) -> dict[str, Any]:
            return {name: values[label] for label, name in _CONTEXT_PARTS[prefix]}

        names = sorted({str(row.role_name) for row in rows if row.role_name is not None})
        link = part("l_")
        return TokenContext(
            RefreshToken(**part("t_")),
            SessionRecord(**part("s_")),
            User(**part("u_")),
            tuple(names),
            UserDevice(**link) if link.get("user_id") is not None else None,
        )

    async def tokens_of(self, session_id: str) -> list[RefreshToken]:
        rows = await self._c.execute(
            select(refresh_tokens)
            .where(refresh_tokens.c.session_id == session_id)
            .order_by(refresh_tokens.c.generation, refresh_tokens.c.id)
        )
        return [RefreshToken(**dict(row._mapping)) for row in rows]

    async def token(self, token_id: int) -> RefreshToken | None:
        row = (await self._c.execute(select(refresh_tokens).where(refresh_tokens.c.id == token_id))).first()
        return to_record(RefreshToken, row)

    async def recent_rotations(self, session_id: str, since: datetime) -> int:
        return int(
            (await self._c.execute(_RECENT_ROTATIONS, {"b_id": session_id, "b_since": since})).scalar() or 0
        )

    async def access_jtis_since(self, user_id: str, since: datetime) -> list[str]:
        query = (
            select(refresh_tokens.c.access_jti)
            .join(sessions, sessions.c.id == refresh_tokens.c.session_id)
            .where(sessions.c.user_id == user_id, refresh_tokens.c.created_at >= since)
        )
        return list((await self._c.execute(query)).scalars())

    async def mark_rotated(self, token_id: int, successor_id: int | None, now: datetime) -> bool:
        result = await self._c.execute(
            _MARK_ROTATED, {"token_id": token_id, "used_at": now, "successor": successor_id}
        )
        return result.rowcount == 1
