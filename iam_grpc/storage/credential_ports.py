"""Ports for the sign-in methods beyond the password: passkeys and linked identities."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from iam_grpc.storage.records import IdentityRecord, PasskeyRecord

__all__ = ["IdentityStore", "PasskeyStore"]


class PasskeyStore(Protocol):
    async def insert(self, passkey: PasskeyRecord) -> None:
        """Add a credential; :class:`~iam_grpc.storage.ports.Conflict` when its id is registered."""
        ...

    async def by_credential(self, credential_hash: str) -> PasskeyRecord | None: ...

    async def of_user(self, user_id: str) -> list[PasskeyRecord]:
        """The user's passkeys, newest first."""
        ...

    async def count(self, user_id: str) -> int: ...

    async def used(
        self, passkey_id: str, *, expect_count: int, sign_count: int, backed_up: bool, now: datetime
    ) -> bool:
        """Record a verified assertion while the stored counter is still ``expect_count`` (two
        replicas verifying one assertion: one wins). Returns whether the row changed."""
        ...

    async def delete(self, user_id: str, passkey_id: str) -> bool: ...


class IdentityStore(Protocol):
    async def insert(self, identity: IdentityRecord) -> None:
        """Link an identity; :class:`~iam_grpc.storage.ports.Conflict` when the provider's subject
        is linked already or the user has one of that provider."""
        ...

    async def by_subject(self, provider: str, subject: str) -> IdentityRecord | None: ...

    async def of_user(self, user_id: str) -> list[IdentityRecord]:
        """The user's identities, by provider."""
        ...

    async def delete(self, user_id: str, provider: str) -> bool: ...
