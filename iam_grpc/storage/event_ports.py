"""The event outbox's port (api.md EventService), next to ``ports.py``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from iam_grpc.storage.records import EventRecord

__all__ = ["EventLog"]


class EventLog(Protocol):
    """Event rows; ``append`` runs in the transaction of the change it describes."""

    async def append(
        self,
        kind: str,
        at: datetime,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...

    async def sequence(self, limit: int = 500) -> int:
        """Number the oldest committed, unnumbered events; how many."""
        ...

    async def waiting(self) -> bool:
        """Whether a committed event waits for its cursor."""
        ...

    async def head(self) -> int:
        """The newest cursor handed out (0 before any)."""
        ...

    async def purged_through(self) -> int:
        """Cursors up to this one name purged events."""
        ...

    async def after(self, seq: int, *, kinds: Sequence[str] = (), limit: int = 500) -> list[EventRecord]:
        """Numbered events after ``seq``, oldest first."""
        ...

    async def purge(self, before: datetime, batch: int) -> int:
        """Delete numbered events older than ``before``; how many."""
        ...
