"""Accounts and their sessions: show, list live sessions, disable and enable, end every session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from iam_grpc.admin.context import AdminTools
from iam_grpc.admin.errors import NotFound
from iam_grpc.logging import mask_email
from iam_grpc.storage.records import SessionRecord, User

__all__ = ["SessionsEnded", "UserView", "live_sessions", "revoke_sessions", "set_status", "show_user"]


@dataclass(frozen=True, slots=True)
class UserView:
    """An account as an operator sees it: no secret, the email masked."""

    id: str
    email: str
    status: str
    roles: list[str]
    created_at: datetime
    last_login_at: datetime | None
    mfa_hold_until: datetime | None
    devices: int
    live_sessions: list[str]


@dataclass(frozen=True, slots=True)
class SessionsEnded:
    """How many sessions a change ended, and whether the running servers' own state was reached
    (``False``: they apply the revocations at their next deny-list replay)."""

    count: int
    reached_service_state: bool


async def _user(tools: AdminTools, who: str) -> User:
    async with tools.db.transaction(read_only=True) as tx:
        found = await tools.find_user(tx, who)
    if found is None:
        raise NotFound("no such user")
    return found


async def show_user(tools: AdminTools, who: str) -> UserView:
    """``who``: an account id or email address."""
    async with tools.db.transaction() as tx:
        found = await tools.find_user(tx, who)
        if found is None:
            raise NotFound("no such user")
        live = await tx.sessions.list_live(found.id, tools.clock.now())
        return UserView(
            id=found.id,
            email=mask_email(found.email),
            status=found.status,
            roles=await tx.users.roles_of(found.id),
            created_at=found.created_at,
            last_login_at=found.last_login_at,
            mfa_hold_until=found.mfa_hold_until,
            devices=len(await tx.devices.links_of(found.id)),
            live_sessions=[s.id for s in live],
        )


async def live_sessions(tools: AdminTools, who: str) -> list[SessionRecord]:
    async with tools.db.transaction() as tx:
        found = await tools.find_user(tx, who)
        if found is None:
            raise NotFound("no such user")
        return list(await tx.sessions.list_live(found.id, tools.clock.now()))


async def set_status(
    tools: AdminTools, who: str, status: Literal["active", "disabled"], *, reason: str = ""
) -> SessionsEnded:
    """Disable an account (every session, API token and mailed link ends at once; logins fail like
    a wrong password) or enable it (what was ended stays ended). Idempotent: setting the status
    the account has changes nothing and writes no event."""
    access = tools.user_access
    sessions: list[str] = []
    secrets: list[str] = []
    async with tools.db.transaction() as tx:
        found = await tools.find_user(tx, who)
        if found is None:
            raise NotFound("no such user")
        if found.status != status:
            await tx.users.set_status(found.id, status, tools.clock.now())
            if status == "disabled":
                sessions, secrets = await access.end_in(tx, found.id, "disabled")
            kind = "user.disabled" if status == "disabled" else "user.enabled"
            details = {"reason": reason} if reason else None
            await tools.audit.record(tools.audit.event(kind, "ok", user_id=found.id, details=details), tx)
    await access.after_commit(sessions, secrets)
    return SessionsEnded(len(sessions), tools.reaches_service_state)


async def revoke_sessions(tools: AdminTools, who: str) -> SessionsEnded:
    """End every session of an account (it can sign in again)."""
    found = await _user(tools, who)
    ended = await tools.revoke_user_sessions(found, "user")
    return SessionsEnded(len(ended), tools.reaches_service_state)
