"""The user directory for admin RPCs (and any operator tool): one user, pages of users, erasure,
the data-subject export and the audit trail.

Pages follow AIP-158: ``page_size`` 1 to 1000 (0: 50), and an opaque ``page_token`` that names
the query it belongs to (a digest of its filters) and where the last page ended; a token of
another query is :class:`Invalid`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from iam_grpc.admin.context import AdminTools
from iam_grpc.admin.errors import Invalid, NotFound
from iam_grpc.core.profiles import UserProfile, profile_of
from iam_grpc.core.ratelimit import email_key
from iam_grpc.ids import ULID_RE
from iam_grpc.storage.records import AuditEvent, UserQuery

__all__ = [
    "AuditPage",
    "UserPage",
    "delete_user",
    "export_user",
    "get_user",
    "list_audit_events",
    "list_users",
]

DEFAULT_PAGE = 50
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class UserPage:
    users: list[UserProfile]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: list[AuditEvent]
    next_page_token: str


def _page_size(size: int) -> int:
    if size < 0 or size > MAX_PAGE:
        raise Invalid("page_size must be between 0 and 1000")
    return size or DEFAULT_PAGE


def _digest(filters: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(filters, default=str).encode()).hexdigest()[:16]


def _token(filters: Sequence[object], after: object) -> str:
    raw = json.dumps({"q": _digest(filters), "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(token: str, filters: Sequence[object]) -> Any:
    """Where the page of ``token`` starts; None for the first page."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Invalid("page_token is not a token of this query") from None
    if not isinstance(raw, dict) or raw.get("q") != _digest(filters) or "a" not in raw:
        raise Invalid("page_token is not a token of this query")
    return raw["a"]


async def get_user(tools: AdminTools, *, user_id: str = "", email: str = "") -> UserProfile:
    """One user by id or by email (any letter case)."""
    if bool(user_id) == bool(email):
        raise Invalid("give one of user_id and email")
    async with tools.db.transaction(read_only=True) as tx:
        if user_id:
            found = await tx.users.get(user_id) if ULID_RE.match(user_id) else None
        else:
            found = await tx.users.get_by_email(email_key(email))
        if found is None or found.status == "deleted":
            raise NotFound("no such user")
        return await profile_of(tx, found)


async def list_users(
    tools: AdminTools,
    *,
    page_size: int = 0,
    page_token: str = "",
    email_prefix: str = "",
    role: str = "",
    status: str = "",
) -> UserPage:
    """Users in id (creation) order, filtered; ``status`` is active, disabled or empty."""
    size = _page_size(page_size)
    prefix = email_key(email_prefix) if email_prefix else ""
    filters = ["users", prefix, role, status]
    after = _after(page_token, filters)
    if after is not None and not (isinstance(after, str) and ULID_RE.match(after)):
        raise Invalid("page_token is not a token of this query")
    query = UserQuery(size + 1, after, prefix or None, role or None, status or None)
    async with tools.db.transaction(read_only=True) as tx:
        found = await tx.directory.list_users(query)
        page = found[:size]
        roles = await tx.directory.roles_of_many([u.id for u in page])
        profiles = [await profile_of(tx, u, roles.get(u.id, [])) for u in page]
    more = len(found) > size
    return UserPage(profiles, _token(filters, page[-1].id) if more else "")


async def list_audit_events(
    tools: AdminTools,
    *,
    user_id: str = "",
    kinds: Sequence[str] = (),
    since: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> AuditPage:
    """Audit events newest first."""
    size = _page_size(page_size)
    filters = ["audit", user_id, sorted(set(kinds)), since.isoformat() if since else ""]
    before = _after(page_token, filters)
    if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
        raise Invalid("page_token is not a token of this query")
    async with tools.db.transaction(read_only=True) as tx:
        found = await tx.directory.audit_page(
            user_id=user_id or None, kinds=list(kinds), since=since, before_id=before, limit=size + 1
        )
    page = found[:size]
    more = len(found) > size
    return AuditPage(page, _token(filters, page[-1].id) if more else "")


async def delete_user(tools: AdminTools, who: str) -> None:
    """Erase a user's personal data and end everything they hold (``core/user_access.py``)."""
    if await tools.user_access.erase(who if ULID_RE.match(who) else "", details={"by": "admin"}) is None:
        raise NotFound("no such user")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _record(row: Any, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: _plain(getattr(row, f.name)) for f in dataclasses.fields(row) if f.name not in without}


async def export_user(tools: AdminTools, who: str) -> dict[str, Any]:
    """The data-subject export: profile, sign-in methods, devices, sessions, API tokens' metadata
    (never a hash or secret) and audit events."""
    async with tools.db.transaction(read_only=True) as tx:
        user = await tools.find_user(tx, who)
        if user is None:
            raise NotFound("no such user")
        profile = await profile_of(tx, user)
        links = await tx.devices.links_of(user.id)
        devices = []
        for link in links:
            device = await tx.devices.get(link.device_id)
            devices.append(
                {
                    **_record(link, without=("baseline", "user_id")),
                    "device": _record(device) if device is not None else None,
                }
            )
        sessions = [_record(s, without=("user_id",)) for s in await tx.directory.sessions_of(user.id)]
        tokens = [
            _record(t, without=("secret_hash", "key_version", "user_id"))
            for t in await tx.api_tokens.all_of(user.id)
        ]
        events = await tx.directory.audit_page(
            user_id=user.id, kinds=[], since=None, before_id=None, limit=10_000
        )
    return {
        "user": _record(user, without=("password_hash", "pepper_id", "credential_version")),
        "roles": profile.roles,
        "mfa_methods": list(profile.methods.mfa_methods),
        "identities": [_record(i) for i in profile.methods.identities],
        "devices": devices,
        "sessions": sessions,
        "api_tokens": tokens,
        "audit_events": [_record(e, without=("user_id",)) for e in events],
    }
