"""The user directory: pages of users and audit events, profile changes, and erasure."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update

from iam_grpc.storage.records import AuditEvent, SessionRecord, User, UserQuery
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import (
    audit_events,
    email_outbox,
    roles,
    sessions,
    user_devices,
    user_roles,
    users,
)

__all__ = ["SqlDirectory"]


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class SqlDirectory:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def list_users(self, query: UserQuery) -> list[User]:
        statement = select(users).where(users.c.status != "deleted").order_by(users.c.id).limit(query.limit)
        if query.after_id is not None:
            statement = statement.where(users.c.id > query.after_id)
        if query.email_prefix:
            statement = statement.where(
                users.c.email_norm.like(_like_prefix(query.email_prefix), escape="\\")
            )
        if query.status is not None:
            statement = statement.where(users.c.status == query.status)
        if query.role is not None:
            holders = (
                select(user_roles.c.user_id)
                .join(roles, roles.c.id == user_roles.c.role_id)
                .where(roles.c.name == query.role)
            )
            statement = statement.where(users.c.id.in_(holders))
        return [User(**dict(row._mapping)) for row in await self._c.execute(statement)]

    async def roles_of_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        if not user_ids:
            return {}
        statement = (
            select(user_roles.c.user_id, roles.c.name)
            .join(roles, roles.c.id == user_roles.c.role_id)
            .where(user_roles.c.user_id.in_(list(user_ids)))
            .order_by(roles.c.name)
        )
        found: dict[str, list[str]] = {user_id: [] for user_id in user_ids}
        for row in await self._c.execute(statement):
            holder, name = row._mapping["user_id"], row._mapping["name"]
            found[str(holder)].append(str(name))
        return found

    async def update_profile(self, user_id: str, changes: dict[str, Any], now: datetime) -> bool:
        result = await self._c.execute(
            update(users)
            .where(users.c.id == user_id, users.c.status == "active")
            .values(**changes, updated_at=now)
        )
        return result.rowcount == 1

    async def sessions_of(self, user_id: str) -> list[SessionRecord]:
        statement = select(sessions).where(sessions.c.user_id == user_id).order_by(sessions.c.created_at)
        return [SessionRecord(**dict(row._mapping)) for row in await self._c.execute(statement)]

    async def audit_page(
        self,
        *,
        user_id: str | None,
        kinds: Sequence[str],
        since: datetime | None,
        before_id: int | None,
        limit: int,
    ) -> list[AuditEvent]:
        statement = select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if user_id:
            statement = statement.where(audit_events.c.user_id == user_id)
        if kinds:
            statement = statement.where(audit_events.c.type.in_(list(kinds)))
        if since is not None:
            statement = statement.where(audit_events.c.occurred_at >= since)
        if before_id is not None:
            statement = statement.where(audit_events.c.id < before_id)
        return [AuditEvent(**dict(row._mapping)) for row in await self._c.execute(statement)]

    async def erase(self, user_id: str, now: datetime) -> bool:
        """Erase the personal data of a user, keeping the row as a tombstone under its id: the
        audit rows stay, with their address, device and details removed; device links and queued
        mail go; sessions lose their addresses and places."""
        result = await self._c.execute(
            update(users)
            .where(users.c.id == user_id, users.c.status != "deleted")
            .values(
                email="",
                email_norm=f"deleted:{user_id}",
                email_verified_at=None,
                password_hash=None,
                name="",
                last_name="",
                locale=None,
                status="deleted",
                disabled_at=now,
                mfa_hold_until=None,
                last_login_at=None,
                updated_at=now,
                credential_version=users.c.credential_version + 1,
            )
        )
        if result.rowcount != 1:
            return False
        await self._c.execute(delete(user_roles).where(user_roles.c.user_id == user_id))
        await self._c.execute(delete(user_devices).where(user_devices.c.user_id == user_id))
        # Sessions stay (revoked by the caller first) so the deny-list rebuilt from SQL still
        # refuses their access tokens; what they say about where the user was goes.
        await self._c.execute(
            update(sessions)
            .where(sessions.c.user_id == user_id)
            .values(
                created_ip="",
                last_ip="",
                last_country=None,
                last_region=None,
                last_city=None,
                last_browser=None,
                last_os=None,
            )
        )
        await self._c.execute(delete(email_outbox).where(email_outbox.c.user_id == user_id))
        await self._c.execute(
            update(audit_events)
            .where(audit_events.c.user_id == user_id)
            .values(ip=None, device_id=None, request_id=None, details={})
        )
        return True
