"""Batched purges for the cleanup job (behaviour.md 1.8): ids first, then a
DELETE by id, so no statement locks more than one batch (MySQL cannot LIMIT
an IN subquery)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, and_, delete, exists, func, or_, select, update

from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import (
    audit_events,
    devices,
    email_outbox,
    refresh_tokens,
    revocations,
    sessions,
    user_devices,
)

__all__ = ["SqlMaintenance"]


class SqlMaintenance:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def _delete_ids(self, table: object, column: object, query: Select[tuple[object]]) -> int:
        ids = list((await self._c.execute(query)).scalars())
        if not ids:
            return 0
        result = await self._c.execute(delete(table).where(column.in_(ids)))  # type: ignore[arg-type, attr-defined]
        return int(result.rowcount)

    async def purge_refresh_tokens(self, used_before: datetime, now: datetime, batch: int) -> int:
        """Rotated or revoked tokens last used (or, never used, created) before the cut-off whose
        session is over; tokens of ended sessions.

        A rotated token is what recognises a replay (behaviour.md 1.5), so it is kept for as long
        as its session can live, however old the cut-off: a thief who rotated the owner's token
        shortly before the cut-off must still meet REFRESH_TOKEN_REUSED when the owner comes back,
        not TOKEN_INVALID while the thief's chain lives on. Age is counted from the rotation
        (``used_at``), not from the token's creation."""
        touched = func.coalesce(refresh_tokens.c.used_at, refresh_tokens.c.created_at)
        over = exists().where(
            sessions.c.id == refresh_tokens.c.session_id,
            or_(sessions.c.revoked_at.is_not(None), sessions.c.absolute_expires_at <= now),
        )
        ended = exists().where(
            sessions.c.id == refresh_tokens.c.session_id, sessions.c.revoked_at.is_not(None)
        )
        query = (
            select(refresh_tokens.c.id)
            .where(
                or_(
                    and_(refresh_tokens.c.state != "active", touched < used_before, over),
                    and_(touched < used_before, ended),
                )
            )
            .limit(batch)
        )
        return await self._delete_ids(refresh_tokens, refresh_tokens.c.id, query)

    async def purge_sessions(self, ended_before: datetime, now: datetime, batch: int) -> int:
        """Sessions revoked, or past their absolute expiry, before the cut-off (their tokens go with them)."""
        query = (
            select(sessions.c.id)
            .where(or_(sessions.c.revoked_at < ended_before, sessions.c.absolute_expires_at < ended_before))
            .limit(batch)
        )
        return await self._delete_ids(sessions, sessions.c.id, query)

    async def purge_outbox(self, done_before: datetime, dead_before: datetime, batch: int) -> int:
        query = (
            select(email_outbox.c.id)
            .where(
                or_(
                    and_(
                        email_outbox.c.status.in_(("sent", "expired", "suppressed")),
                        email_outbox.c.created_at < done_before,
                    ),
                    and_(email_outbox.c.status == "dead", email_outbox.c.created_at < dead_before),
                )
            )
            .limit(batch)
        )
        return await self._delete_ids(email_outbox, email_outbox.c.id, query)

    async def wipe_outbox_secrets(self, batch: int) -> int:
        """Secrets of any row that is no longer pending (S51), should a wipe have been missed."""
        query = (
            select(email_outbox.c.id)
            .where(email_outbox.c.status != "pending", email_outbox.c.sealed_params.is_not(None))
            .limit(batch)
        )
        ids = list((await self._c.execute(query)).scalars())
        if not ids:
            return 0
        await self._c.execute(
            update(email_outbox).where(email_outbox.c.id.in_(ids)).values(sealed_params=None)
        )
        return len(ids)

    async def purge_audit(self, before: datetime, batch: int) -> int:
        query = select(audit_events.c.id).where(audit_events.c.occurred_at < before).limit(batch)
        return await self._delete_ids(audit_events, audit_events.c.id, query)

    async def purge_devices(self, unseen_before: datetime, batch: int) -> int:
        """Untrusted user-devices unseen since the cut-off, then devices no user refers to."""
        untrusted = or_(
            user_devices.c.trusted_at.is_(None),
            and_(
                user_devices.c.trust_revoked_at.is_not(None),
                user_devices.c.trust_revoked_at >= user_devices.c.trusted_at,
            ),
        )
        stale_links = (
            select(user_devices.c.user_id, user_devices.c.device_id)
            .where(untrusted, user_devices.c.last_seen_at < unseen_before)
            .limit(batch)
        )
        removed = 0
        for user_id, device_id in [tuple(row) for row in (await self._c.execute(stale_links)).all()]:
            result = await self._c.execute(
                delete(user_devices).where(
                    user_devices.c.user_id == user_id, user_devices.c.device_id == device_id
                )
            )
            removed += int(result.rowcount)
        orphans = (
            select(devices.c.id)
            .where(
                devices.c.last_seen_at < unseen_before,
                ~exists().where(user_devices.c.device_id == devices.c.id),
                ~exists().where(sessions.c.device_id == devices.c.id),
            )
            .limit(batch)
        )
        return removed + await self._delete_ids(devices, devices.c.id, orphans)

    async def purge_revocations(self, now: datetime, batch: int) -> int:
        """Revocations whose tokens have all expired (the deny-list no longer needs them)."""
        query = select(revocations.c.id).where(revocations.c.expires_at <= now).limit(batch)
        return await self._delete_ids(revocations, revocations.c.id, query)
