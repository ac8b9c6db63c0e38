"""The in-process ephemeral store: TTLs on the injected clock, bounded size, protected keys."""

from __future__ import annotations

from datetime import timedelta

from iam_grpc.clock import ManualClock
from iam_grpc.storage.memory import MemoryEphemeral

MINUTE = timedelta(minutes=1)


async def test_values_expire_on_the_injected_clock() -> None:
    """Expiry follows the clock, not the wall time."""
    clock = ManualClock()
    store = MemoryEphemeral(max_keys=1000, clock=clock)
    await store.set("k", b"v", MINUTE)
    clock.advance(59)
    assert await store.get("k") == b"v"
    clock.advance(1)
    assert await store.get("k") is None


async def test_when_full_the_least_recently_used_counters_go_first() -> None:
    """A full store evicts old counters to make room."""
    store = MemoryEphemeral(max_keys=1000, clock=ManualClock())
    for i in range(1000):
        await store.incr(f"c{i}", 1, MINUTE)
    await store.incr("c0", 1, MINUTE)  # c0 is now recently used
    await store.incr("new", 1, MINUTE)
    assert len(store) == 1000
    assert await store.exists(["c0", "c1", "new"]) == [True, False, True]


async def test_single_use_marks_and_deny_entries_are_never_evicted_early() -> None:
    """Values written with set/set_if_absent survive pressure from counters until their TTL."""
    clock = ManualClock()
    store = MemoryEphemeral(max_keys=1000, clock=clock)
    for i in range(1000):
        await store.set_if_absent(f"link:used:{i}", b"1", MINUTE)
    for i in range(500):
        await store.incr(f"rl:{i}", 1, MINUTE)
    assert all(await store.exists([f"link:used:{i}" for i in range(1000)]))
    assert len(store) == 1001  # counters took turns in the one slot left over
    clock.advance(61)
    assert store.sweep() == 1001
    assert len(store) == 0


async def test_sweep_drops_only_expired_keys() -> None:
    """The periodic sweep keeps live keys."""
    clock = ManualClock()
    store = MemoryEphemeral(max_keys=1000, clock=clock)
    await store.set("short", b"1", timedelta(seconds=1))
    await store.set("long", b"1", MINUTE)
    clock.advance(2)
    assert store.sweep() == 1
    assert await store.get("long") == b"1"


async def test_ttl_is_reported_from_the_clock() -> None:
    """ttl shrinks as the clock moves."""
    clock = ManualClock()
    store = MemoryEphemeral(max_keys=1000, clock=clock)
    await store.set("k", b"v", MINUTE)
    clock.advance(15)
    assert await store.ttl("k") == timedelta(seconds=45)
