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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self, TypeVar

from iam_grpc.clock import Clock, SystemClock
from iam_grpc.storage import sliding_window
from iam_grpc.storage.ports import one_hash_tag
from iam_grpc.storage.records import HitResult, LimitSpec

__all__ = ["MemoryEphemeral", "MemoryLimiterStore"]

R = TypeVar("R")


@dataclass(slots=True)
class _Entry:
    value: Any  # bytes for the Ephemeral port; a state dict for rate limits
    expires: float  # clock.monotonic() deadline
    evictable: bool


class MemoryEphemeral:
    """The :class:`~iam_grpc.storage.ports.Ephemeral` port in process memory.

    Counters (evictable) and protected values live in separate tables, so
    making room is O(1): the oldest counter of an LRU-ordered dict goes.
    """

    def __init__(
        self, max_keys: int = 200_000, clock: Clock | None = None, sweep_every: float = 30.0
    ) -> None:
        self._clock = clock or SystemClock()
        self._max_keys = max_keys
        self._sweep_every = sweep_every
        self._protected: dict[str, _Entry] = {}
        self._counters: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
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

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ping(self) -> None:
        return None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            self.sweep()

    def sweep(self) -> int:
        """Drop every expired key; returns how many."""
        now = self._clock.monotonic()
        dead = [
            key for table in (self._protected, self._counters) for key, e in table.items() if e.expires <= now
        ]
        for key in dead:
            self._drop(key)
        return len(dead)

    def __len__(self) -> int:
        return len(self._protected) + len(self._counters)

    # internals -----------------------------------------------------------------

    def _live(self, key: str) -> _Entry | None:
        entry = self._counters.get(key)
        if entry is not None:
            self._counters.move_to_end(key)
        else:
            entry = self._protected.get(key)
            if entry is None:
                return None
        if entry.expires <= self._clock.monotonic():
            self._drop(key)
            return None
        return entry

    def _drop(self, key: str) -> None:
        if self._counters.pop(key, None) is None:
            self._protected.pop(key, None)

    def _deadline(self, ttl: timedelta) -> float:
        seconds = ttl.total_seconds()
        if seconds <= 0:
            raise ValueError("every ephemeral value needs a positive TTL")
        return self._clock.monotonic() + seconds

    def _store(self, key: str, value: Any, expires: float, evictable: bool) -> None:
        self._drop(key)
        if len(self) >= self._max_keys and self._counters:
            self._counters.popitem(last=False)  # the least recently used counter makes room
        # With only protected keys left the store may exceed the bound: they end with their TTLs.
        (self._counters if evictable else self._protected)[key] = _Entry(value, expires, evictable)

    # the port --------------------------------------------------------------------

    def mutate(self, key: str, change: Callable[[Any | None], tuple[Any, float, R]]) -> R:
        """Atomically replace an evictable value: ``change(old)`` returns (new, ttl seconds, result).

        A new value of None deletes the key. Used by stores built on this one.
        """
        entry = self._live(key)
        new, ttl, result = change(entry.value if entry else None)
        if new is None:
            self._drop(key)
        else:
            self._store(key, new, self._deadline(timedelta(seconds=ttl)), evictable=True)
        return result

    def read(self, key: str) -> Any | None:
        entry = self._live(key)
        return entry.value if entry else None

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return entry.value if entry else None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        one_hash_tag(keys)  # as Redis Cluster would: a mistake shows in embedded mode too
        return [entry.value if (entry := self._live(key)) else None for key in keys]

    async def values(self, keys: Sequence[str]) -> list[bytes | None]:
        return [entry.value if (entry := self._live(key)) else None for key in keys]

    async def set(self, key: str, value: bytes, ttl: timedelta) -> None:
        self._store(key, value, self._deadline(ttl), evictable=False)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: timedelta) -> None:
        expires = self._deadline(ttl)
        for key, value in items:
            self._store(key, value, expires, evictable=False)

    async def set_many_waiting(
        self, items: Sequence[tuple[str, bytes]], ttl: timedelta, *, within: timedelta
    ) -> bool:
        await self.set_many(items, ttl)
        return True

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
        value: bytes = entry.value
        return value

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
    ) -> bool:
        entry = self._live(key)
        if entry is None or entry.value != expected:
            return False
        expires = entry.expires if ttl is None else self._deadline(ttl)
        self._store(key, value, expires, entry.evictable)
        return True

    async def extend(self, key: str, expected: bytes, ttl: timedelta) -> bool:
        return await self.compare_and_set(key, expected, expected, ttl)

    async def delete_if(self, key: str, expected: bytes) -> bool:
        entry = self._live(key)
        if entry is None or entry.value != expected:
            return False
        self._drop(key)
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


class MemoryLimiterStore:
    """The :class:`~iam_grpc.storage.ports.LimiterStore` port in process memory.

    Runs :mod:`iam_grpc.storage.sliding_window` on state kept in a
    :class:`MemoryEphemeral` (so the same bound covers both), with no ``await``
    between reading and writing a key's state.
    """

    def __init__(self, memory: MemoryEphemeral) -> None:
        self._memory = memory

    async def hit(self, key: str, spec: LimitSpec, now_ms: int, cost: int = 1) -> HitResult:
        def change(old: Any | None) -> tuple[Any, float, HitResult]:
            state = dict(old or {})
            result = sliding_window.hit(state, spec, now_ms, cost)
            return state, sliding_window.state_ttl_ms(state, spec, now_ms) / 1000, result

        return self._memory.mutate(key, change)

    async def refund(
        self,
        key: str,
        spec: LimitSpec,
        now_ms: int,
        windows: tuple[int, ...],
        buckets: tuple[int, ...],
        cost: int = 1,
    ) -> None:
        def change(old: Any | None) -> tuple[Any, float, None]:
            if old is None:
                return None, 0.0, None
            state = dict(old)
            sliding_window.refund(state, spec, now_ms, windows, buckets, cost)
            return state, sliding_window.state_ttl_ms(state, spec, now_ms) / 1000, None

        self._memory.mutate(key, change)

    async def reset(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        def change(old: Any | None) -> tuple[Any, float, None]:
            if old is None:
                return None, 0.0, None
            state = dict(old)
            sliding_window.reset(state, windows)
            return state, sliding_window.state_ttl_ms(state, spec, now_ms) / 1000, None

        self._memory.mutate(key, change)

    async def leave_one(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        def change(old: Any | None) -> tuple[Any, float, None]:
            if old is None:
                return None, 0.0, None
            state = dict(old)
            sliding_window.leave_one(state, spec, now_ms, windows)
            return state, sliding_window.state_ttl_ms(state, spec, now_ms) / 1000, None

        self._memory.mutate(key, change)

    async def peek(self, key: str, spec: LimitSpec, now_ms: int) -> dict[str, Any]:
        return sliding_window.peek(dict(self._memory.read(key) or {}), spec, now_ms)

    async def clear(self, key: str) -> bool:
        return await self._memory.delete(key) == 1

    async def ping(self) -> None:
        return None
