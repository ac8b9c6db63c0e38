"""In-process ephemeral store for embedded mode.

Every operation runs without an ``await`` between its read and its write, so
it is atomic on the event loop, like a Lua script on Redis. The store is
bounded (``ephemeral.memory_max_keys``): when full, the least recently used
*counters* go first; single-use marks, deny-list entries and challenges
(values written with :meth:`set` and friends) are never evicted early. Expired
keys are swept every 30 s and ignored on read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.clock import Clock, SystemClock

__all__ = ["MemoryEphemeral"]


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires: float  # clock.monotonic() deadline
    evictable: bool


class MemoryEphemeral:
    """The :class:`~iam_grpc.storage.ports.Ephemeral` port in process memory."""

    def __init__(
        self, max_keys: int = 200_000, clock: Clock | None = None, sweep_every: float = 30.0
    ) -> None:
        self._clock = clock or SystemClock()
        self._max_keys = max_keys
        self._sweep_every = sweep_every
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._evictable = 0
        self._sweeper: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name="ephemeral-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def ping(self) -> None:
        return None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            self.sweep()

    def sweep(self) -> int:
        """Drop every expired key; returns how many."""
        now = self._clock.monotonic()
        dead = [key for key, entry in self._data.items() if entry.expires <= now]
        for key in dead:
            self._drop(key)
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)

    # internals -----------------------------------------------------------------

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock.monotonic():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._data.pop(key, None)
        if entry is not None and entry.evictable:
            self._evictable -= 1

    def _deadline(self, ttl: timedelta) -> float:
        seconds = ttl.total_seconds()
        if seconds <= 0:
            raise ValueError("every ephemeral value needs a positive TTL")
        return self._clock.monotonic() + seconds

    def _store(self, key: str, value: bytes, expires: float, evictable: bool) -> None:
        self._drop(key)
        if len(self._data) >= self._max_keys:
            self._make_room()
        self._data[key] = _Entry(value, expires, evictable)
        if evictable:
            self._evictable += 1

    def _make_room(self) -> None:
        """Free one slot: expired keys first, then the least recently used counters."""
        now = self._clock.monotonic()
        victim = None
        for key, entry in self._data.items():  # least recently used first
            if entry.evictable or entry.expires <= now:
                victim = key
                break
        if victim is not None:
            self._drop(victim)
        # else: only protected keys are left; they are bounded by their TTLs

    # the port --------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return entry.value if entry else None

    async def set(self, key: str, value: bytes, ttl: timedelta) -> None:
        self._store(key, value, self._deadline(ttl), evictable=False)

    async def set_if_absent(self, key: str, value: bytes, ttl: timedelta) -> bool:
        if self._live(key) is not None:
            return False
        self._store(key, value, self._deadline(ttl), evictable=False)
        return True

    async def get_and_delete(self, key: str) -> bytes | None:
        entry = self._live(key)
        if entry is None:
            return None
        self._drop(key)
        return entry.value

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
    ) -> bool:
        entry = self._live(key)
        if entry is None or entry.value != expected:
            return False
        expires = entry.expires if ttl is None else self._deadline(ttl)
        self._store(key, value, expires, entry.evictable)
        return True

    async def incr(self, key: str, amount: int, ttl: timedelta) -> int:
        entry = self._live(key)
        if entry is None:
            current, expires = 0, self._deadline(ttl)
        else:
            current, expires = int(entry.value), entry.expires
        current += amount
        self._store(key, str(current).encode(), expires, evictable=True)
        return current

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in keys:
            if self._live(key) is not None:
                self._drop(key)
                removed += 1
        return removed

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        return [self._live(key) is not None for key in keys]

    async def ttl(self, key: str) -> timedelta | None:
        entry = self._live(key)
        if entry is None:
            return None
        return timedelta(seconds=max(0.0, entry.expires - self._clock.monotonic()))
