"""Ports of the user directory and personal API tokens (re-exported by
:mod:`iam_grpc.storage.ports`, whose ``Transaction`` offers them as ``tx.directory`` and
``tx.api_tokens``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from iam_grpc.storage.records import ApiTokenRecord, AuditEvent, SessionRecord, User, UserQuery

__all__ = ["ApiTokenStore", "Directory", "DirectoryStores"]


class ApiTokenStore(Protocol):
    """Personal API tokens (api.md, ApiTokenService)."""

    async def insert(self, token: ApiTokenRecord) -> None: ...

    async def get(self, token_id: str) -> ApiTokenRecord | None: ...

    async def by_hash(self, hashes: Sequence[str]) -> ApiTokenRecord | None:
        """The token whose current secret has one of these keyed hashes (one per master key)."""
        ...

    async def live_of(self, user_id: str, now: datetime) -> list[ApiTokenRecord]:
        """Unrevoked, unexpired tokens, newest first."""
        ...

    async def all_of(self, user_id: str) -> list[ApiTokenRecord]: ...

    async def count_live(self, user_id: str, now: datetime) -> int:
        """Live tokens of the user, counted under a lock of the user's row (until the commit)."""
        ...

    async def revoke(self, token_id: str, reason: str, now: datetime) -> bool: ...

    async def revoke_all(self, user_id: str, reason: str, now: datetime) -> list[str]:
        """Revoke every unrevoked token of the user; the secret hashes they had."""
        ...

    async def replace_secret(
        self, token_id: str, expect_hash: str, prefix: str, secret_hash: str, key_version: int, now: datetime
    ) -> bool:
        """Compare-and-set the secret of an unrevoked token."""
        ...

    async def record_use(self, used: Mapping[str, datetime]) -> None:
        """Move ``last_used_at`` forward (a batch from the flush job)."""
        ...

    async def delete_of(self, user_id: str) -> list[str]:
        """Erase every token of the user; the hashes of those that were live."""
        ...


class Directory(Protocol):
    """Users as an admin sees them: pages, profile changes, erasure, the audit trail."""

    async def list_users(self, query: UserQuery) -> list[User]:
        """Not erased, in id order, after ``query.after_id``."""
        ...

    async def roles_of_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]: ...

    async def update_profile(self, user_id: str, changes: dict[str, Any], now: datetime) -> bool:
        """Set profile columns of an active user."""
        ...

    async def sessions_of(self, user_id: str) -> list[SessionRecord]:
        """Every session row, live or ended, oldest first."""
        ...

    async def audit_page(
        self,
        *,
        user_id: str | None,
        kinds: Sequence[str],
        since: datetime | None,
        before_id: int | None,
        limit: int,
    ) -> list[AuditEvent]:
        """Newest first, ids below ``before_id``."""
        ...

    async def erase(self, user_id: str, now: datetime) -> bool:
        """Remove the user's personal data; the row stays under its id with status ``deleted``."""
        ...


class DirectoryStores(Protocol):
    """The stores of this module as a transaction offers them (``Transaction`` extends this)."""

    @property
    def api_tokens(self) -> ApiTokenStore: ...

    @property
    def directory(self) -> Directory: ...
