"""Each worker's in-memory copy of the deny-lists (issue 14): a token check costs no round trip.

The copy is loaded in full from SQL (the authority) before the worker serves, then kept current
from the deny-list's change feed (:class:`~iam_grpc.storage.ports.DenyFeed`): every
:data:`poll <DenyMirror.poll_every>` it reads, in one round trip, the generation marker of the
shared cache (:mod:`~iam_grpc.core.tokens.revocation_cache`) and the changes since its cursor.

- The copy is **current** while the last read that succeeded *started* at most ``staleness``
  (1 s by default) ago: a revocation written before that start is in the copy, so one written
  anywhere reaches every worker within the bound. A revocation of this worker's own is in its
  copy at once.
- A marker other than the one the copy was loaded under (the shared cache was lost and rebuilt:
  Redis restarted, flushed, failed over, or a write failed somewhere) means the feed may have
  lost changes: the copy is reloaded from SQL at once. A missing or incomplete marker, or the
  shared cache untrusted, leaves the copy not current until that reload.
- While it is not current the caller (:class:`~iam_grpc.core.tokens.denylist.DenyList`) reads
  per call (the shared cache, or SQL), or refuses (``tokens.denylist_stale = "refuse"``).

The reload notes the feed's head *before* it reads SQL, then applies the changes after it: a
revocation commits in SQL before its change is published, so it is in one or the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Protocol

from iam_grpc.background import end_tasks
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger

__all__ = ["DenyFeed", "DenyMirror"]

log = component_logger("iam.denylist")

_PRUNE_EVERY = 10.0
_STOP_GRACE = 5.0  # seconds the cancelled feed reader may take to end
_FULL_RELOAD_AFTER = 300.0  # seconds without a successful read: the feed may be trimmed past us


class DenyFeed(Protocol):
    """The deny-list's change feed (issue 14): every revocation's keys, in order, so each worker
    keeps an in-memory copy current without a round trip per token check. A Redis stream under
    :data:`~iam_grpc.storage.ports.DENY_TAG` (one slot with the entries and their generation
    marker); cursors are the stream's entry ids. Entries older than the feed's retention may be trimmed."""

    async def publish(self, keys: Sequence[str], *, within: timedelta) -> None:
        """Append one change, tried again for at most ``within`` (then BackendUnavailable)."""
        ...

    async def head(self) -> str:
        """The cursor after the newest change ("0-0" for an empty feed)."""
        ...

    async def read(self, cursor: str, with_value: str) -> tuple[bytes | None, str, list[str]]:
        """The value of the key ``with_value`` (the generation marker), then every change after
        ``cursor`` (the new cursor and their keys), read in one round trip."""
        ...


class DenyMirror:
    def __init__(
        self,
        feed: DenyFeed,
        load: Callable[[], Awaitable[Sequence[tuple[str, bytes]]]],
        trusted: Callable[[], bool],
        *,
        complete: Callable[[bytes | None], bool],
        marker_key: str,
        staleness: timedelta,
        entry_ttl: timedelta,
    ) -> None:
        self._feed = feed
        self._load = load
        self._trusted = trusted
        self._complete = complete  # a valid marker of the server this worker is connected to
        self._marker_key = marker_key
        self._staleness = staleness.total_seconds()
        self._ttl = entry_ttl.total_seconds()
        self.poll_every = max(0.02, min(self._staleness / 5, 1.0))
        self._keys: dict[str, float] = {}  # key -> monotonic time it may be forgotten
        self._marker: bytes | None = None  # the marker the copy was loaded under
        self._cursor = "0-0"
        self._synced_at = -1e18  # monotonic start of the last read that succeeded
        self._loaded = False
        self._pruned = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    @property
    def staleness(self) -> float:
        return self._staleness

    def current(self) -> bool:
        return self._loaded and time.monotonic() - self._synced_at <= self._staleness

    def holds(self, key: str) -> bool:
        return key in self._keys

    def add(self, keys: Iterable[str]) -> None:
        """This worker's own revocations: in the copy at once (the feed brings them again)."""
        until = time.monotonic() + self._ttl
        for key in keys:
            self._keys[key] = until

    def lost(self) -> None:
        """The shared cache lost trust: not current until reloaded under a new marker."""
        self._loaded = False

    async def reload(self) -> bool:
        """Load every entry from SQL under the current marker; True when the copy is current."""
        started = time.monotonic()
        cursor = await self._feed.head()
        marker, _, _ = await self._feed.read(cursor, self._marker_key)
        if not self._trusted() or not self._complete(marker):
            self._loaded = False
            return False
        entries = await self._load()
        until = time.monotonic() + self._ttl
        self._keys = {key: until for key, _ in entries}
        self._marker, self._cursor = marker, cursor
        self._loaded = True
        self.reloads += 1
        await self.read_once(since=started)
        log.bind(entries=len(self._keys)).info("deny-list copy loaded from SQL")
        return self.current()

    async def read_once(self, *, since: float | None = None) -> None:
        """One read of the marker and the changes since the cursor."""
        started = time.monotonic() if since is None else since
        away = self._synced_at > 0 and started - self._synced_at > _FULL_RELOAD_AFTER
        if not self._loaded or away:
            if self._trusted():
                await self.reload()
            return
        marker, cursor, keys = await self._feed.read(self._cursor, self._marker_key)
        if marker != self._marker or not self._complete(marker):
            self._loaded = False  # rebuilt, lost, or a replicated marker of another server
            if self._trusted() and self._complete(marker):
                await self.reload()  # rebuilt meanwhile: the feed may have lost changes
            return
        self.add(keys)
        self._cursor = cursor
        self._synced_at = max(self._synced_at, started)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every)
            try:
                await self.read_once()
            except BackendUnavailable:
                continue  # the copy ages; past the bound the checks read per call
            except Exception:
                log.exception("deny-list copy: reading the feed failed unexpectedly")
            now = time.monotonic()
            if now - self._pruned > _PRUNE_EVERY:
                self._pruned = now
                self._keys = {k: until for k, until in self._keys.items() if until > now}

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="deny-list-feed")

    async def close(self) -> None:
        await end_tasks([self._task], grace=_STOP_GRACE)
        self._task = None
