"""Roles (behaviour.md 1.4): list, create, delete, grant and revoke; a change shows in tokens
from their next refresh, or at once for a revocation with ``now``."""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.admin.context import AdminTools
from iam_grpc.admin.errors import Invalid, NotFound
from iam_grpc.core.validation import ROLE_NAME

__all__ = ["RoleRevoked", "RoleView", "create_role", "delete_role", "grant_role", "list_roles", "revoke_role"]


@dataclass(frozen=True, slots=True)
class RoleView:
    role: str
    description: str | None
    holders: int


@dataclass(frozen=True, slots=True)
class RoleRevoked:
    revoked: bool  # False: the user did not hold the role
    tokens: int  # access tokens revoked with it (``now``)
    cached: bool  # the deny-list cache took them (else servers apply them at their next replay)
    reached_service_state: bool


def _check_name(name: str) -> None:
    if not ROLE_NAME.match(name):
        raise Invalid("role names match ^[a-z][a-z0-9:_-]{0,63}$")


async def list_roles(tools: AdminTools) -> list[RoleView]:
    async with tools.db.transaction() as tx:
        return [RoleView(*row) for row in await tx.users.list_roles()]


async def create_role(tools: AdminTools, name: str) -> None:
    """Create a role (granting creates it too); an existing one is left as it is."""
    _check_name(name)
    async with tools.db.transaction() as tx:
        await tx.users.ensure_roles([name], tools.clock.now())


async def delete_role(tools: AdminTools, name: str) -> None:
    """Delete a role and every grant of it."""
    async with tools.db.transaction() as tx:
        if not await tx.users.delete_role(name):
            raise NotFound(f"no role {name}")
        await tools.audit.record(
            tools.audit.event("roles.revoked", "ok", details={"role": name, "all": True}), tx
        )


async def grant_role(tools: AdminTools, who: str, role: str, *, end_sessions: bool = False) -> bool:
    """True when granted now; False when the user already held it. ``end_sessions``: every session
    of the user ends, so the role reaches tokens at once (at the next sign-in)."""
    _check_name(role)
    now = tools.clock.now()
    access = tools.user_access
    sessions: list[str] = []
    async with tools.db.transaction() as tx:
        found = await tools.find_user(tx, who)
        if found is None:
            raise NotFound("no such user")
        await tx.users.ensure_roles([role], now)
        granted = bool(await tx.users.grant_role(found.id, role, _granted_by(tools), now))
        if granted:
            details = {"role": role, "end_sessions": end_sessions}
            await tools.audit.record(
                tools.audit.event("roles.granted", "ok", user_id=found.id, details=details), tx
            )
        if end_sessions:
            sessions = await tx.sessions.revoke_all(found.id, "roles", now)
            await tools.audit.sessions_revoked(tx, found.id, sessions, "roles")
    await access.after_commit(sessions, [])
    return granted


def _granted_by(tools: AdminTools) -> str:
    """ "cli" from the command line, else the calling service's id."""
    caller = tools.audit.event("roles.granted", "ok").caller
    return (caller or "cli")[:64]


async def revoke_role(
    tools: AdminTools, who: str, role: str, *, now: bool, end_sessions: bool = False
) -> RoleRevoked:
    """Revoke ``role``; with ``now`` the user's current access tokens stop verifying at once; with
    ``end_sessions`` every session of the user ends too."""
    at = tools.clock.now()
    jtis: list[str] = []
    sessions: list[str] = []
    async with tools.db.transaction() as tx:
        found = await tools.find_user(tx, who)
        if found is None:
            raise NotFound("no such user")
        revoked = bool(await tx.users.revoke_role(found.id, role))
        if revoked and now:
            jtis = await tx.sessions.access_jtis_since(found.id, at - tools.denylist.memory)
            # SQL first, in this transaction: the deny-list cache is rebuilt from it
            await tools.denylist.record_tokens(tx, jtis)
        if revoked:
            details = {"role": role, "now": now, "tokens": len(jtis), "end_sessions": end_sessions}
            await tools.audit.record(
                tools.audit.event("roles.revoked", "ok", user_id=found.id, details=details), tx
            )
        if end_sessions:
            sessions = await tx.sessions.revoke_all(found.id, "roles", at)
            await tools.audit.sessions_revoked(tx, found.id, sessions, "roles")
    cached = await tools.denylist.revoke_tokens(jtis) if jtis else True
    await tools.user_access.after_commit(sessions, [])
    return RoleRevoked(revoked, len(jtis), cached, tools.reaches_service_state)
