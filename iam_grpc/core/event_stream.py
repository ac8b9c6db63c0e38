"""The event stream of one replica (api.md EventService.WatchEvents).

One poller per process numbers the outbox's committed events (the sequencer of
``storage/sql/events.py``; any replica may run it, one at a time) and reads the new ones every
``poll_interval``, or at once when :meth:`EventStream.wake` is called, and hands them to every
watcher of the process. A watcher resumes from a cursor by reading SQL first, then follows the
poller; events arrive in cursor order, at least once (a consumer deduplicates by event id).

Memory per watcher is bounded: a watcher whose buffer fills up (a slow reader) loses the buffer,
not the events; it reads them from SQL again from its last cursor. Leaving the stream's context
ends every watch cleanly (the server drains); a watch started then ends at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Self

from iam_grpc.background import WokenLoop
from iam_grpc.clock import Clock
from iam_grpc.core.events import KINDS
from iam_grpc.errors import BackendUnavailable, CursorExpired, InvalidArgument
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database
from iam_grpc.storage.records import EventRecord

__all__ = ["EventStream", "format_cursor", "parse_cursor"]

log = component_logger("iam.events")

_PAGE = 500
_STOP_GRACE = 10.0  # seconds a poll in flight may take to finish at shutdown
_MAX_CURSOR_DIGITS = 19  # a signed 64-bit id


def format_cursor(seq: int) -> str:
    return str(seq)


def parse_cursor(text: str) -> int | None:
    """None for an empty cursor (from now); INVALID_ARGUMENT unless it is one this service hands out."""
    if text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_CURSOR_DIGITS:
        raise InvalidArgument.one("after_cursor", "not a cursor of this stream")
    return int(text)


def check_kinds(kinds: Sequence[str]) -> frozenset[str]:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise InvalidArgument.one("kinds", "an unknown event kind")
    return frozenset(kinds)


class _Watcher:
    """One watcher's buffer: events the poller read, in cursor order, bounded."""

    def __init__(self, limit: int) -> None:
        self.items: deque[EventRecord] = deque()
        self.limit = limit
        self.overflowed = False
        self.closed = False
        self.ready = asyncio.Event()

    def push(self, records: Sequence[EventRecord]) -> None:
        if self.overflowed or self.closed:
            return
        if len(self.items) + len(records) > self.limit:
            self.overflowed = True  # the watcher reads SQL again from its last cursor
            self.items.clear()
        else:
            self.items.extend(records)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()


class EventStream:
    """``async with`` runs the poller; :meth:`watch` follows it; :meth:`end_watches` ends the
    watches (before the server stops, so streams end with OK instead of the grace running out)."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        retention: timedelta,
        poll_interval: timedelta,
        buffer: int,
        on_new_events: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._db = db
        self._clock = clock
        self._retention = retention
        self._buffer = buffer
        self._watchers: set[_Watcher] = set()
        self._listeners = tuple(on_new_events)  # the push sinks: woken when there are new events
        self._last: int | None = None  # the newest cursor the poller has handed out
        self._loop = WokenLoop("event-stream", self._pass, poll_interval.total_seconds(), grace=_STOP_GRACE)
        self._ended = False

    # the poller -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for new events now (a nudge from another replica, or a test)."""
        self._loop.wake()

    async def poll_once(self) -> int:
        """Number the committed events, then hand new ones to the watchers; how many were new."""
        async with self._db.transaction(read_only=True) as tx:
            waiting = await tx.events.waiting()
        while waiting:  # the write transaction only when there is something to number
            async with self._db.transaction() as tx:
                waiting = await tx.events.sequence(_PAGE) == _PAGE
        async with self._db.transaction(read_only=True) as tx:
            if self._last is None:
                self._last = await tx.events.head()
                return 0
            last = self._last
            found: list[EventRecord] = []
            while True:
                page = await tx.events.after(last, limit=_PAGE)
                if page and page[-1].seq is not None:
                    last = page[-1].seq
                    found.extend(page)
                if len(page) < _PAGE:
                    break
            self._last = last
        if found:
            for watcher in list(self._watchers):
                watcher.push(found)
            for listener in self._listeners:
                listener()
        return len(found)

    async def _pass(self) -> None:
        try:
            await self.poll_once()
        except BackendUnavailable:
            log.warning("event poll could not reach the database")

    async def __aenter__(self) -> Self:
        # The position is taken before any watch can start (the server starts later): from here
        # every new event reaches every watcher, by this poller or by the watcher's own reading.
        with contextlib.suppress(BackendUnavailable):
            await self.poll_once()
        self._loop.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.end_watches()
        # A poll in flight finishes rather than being cancelled inside a query (the loop ends
        # between passes, cancelled only past the grace).
        await self._loop.stop()

    async def end_watches(self) -> None:
        self._ended = True
        for watcher in list(self._watchers):
            watcher.close()

    # retention ------------------------------------------------------------------------------

    async def purge_expired(self, batch: int = 1000) -> int:
        """Delete the events older than the retention (a background job); how many."""
        before = self._clock.now() - self._retention
        total = 0
        while True:
            async with self._db.transaction() as tx:
                count = await tx.events.purge(before, batch)
            total += count
            if count < batch:
                return total

    # watching -------------------------------------------------------------------------------

    async def _start(self, after: int | None) -> int:
        async with self._db.transaction(read_only=True) as tx:
            head = await tx.events.head()
            if after is None:
                return head
            # older than the retention (its successors are purged), or never handed out
            if after < await tx.events.purged_through() or after > head:
                raise CursorExpired()
            return after

    async def _catch_up(self, last: int, kinds: frozenset[str]) -> AsyncIterator[EventRecord]:
        while True:
            async with self._db.transaction(read_only=True) as tx:
                page = await tx.events.after(last, kinds=sorted(kinds), limit=_PAGE)
            for record in page:
                yield record
                assert record.seq is not None
                last = record.seq
            if len(page) < _PAGE:
                return

    async def watch(self, after_cursor: str, kinds: Sequence[str] = ()) -> AsyncIterator[EventRecord]:
        """Every event after ``after_cursor`` (empty: from now) of ``kinds`` (empty: all), then
        new ones as they are written, until :meth:`end_watches`. CURSOR_EXPIRED for a cursor
        older than the retention (or never handed out); INVALID_ARGUMENT for a malformed one."""
        wanted = check_kinds(kinds)
        start = parse_cursor(after_cursor)
        watcher = _Watcher(self._buffer)
        if self._ended:
            return
        self._watchers.add(watcher)  # before reading SQL: nothing committed meanwhile is missed
        try:
            last = await self._start(start)
            while not watcher.closed:
                watcher.overflowed = False
                async for record in self._catch_up(last, wanted):
                    yield record
                    assert record.seq is not None
                    last = record.seq
                while not watcher.closed and not watcher.overflowed:
                    await watcher.ready.wait()
                    watcher.ready.clear()
                    while watcher.items and not watcher.overflowed and not watcher.closed:
                        record = watcher.items.popleft()
                        assert record.seq is not None
                        if record.seq <= last or (wanted and record.kind not in wanted):
                            continue
                        yield record
                        last = record.seq
        finally:
            self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        return len(self._watchers)
