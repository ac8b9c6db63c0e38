"""The deny-list cache's generation marker (core/tokens/revocation_cache.py), on the in-process
store: when a replica trusts the cache, and how it gets back to trusting it after a loss."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import pytest

from iam_grpc.core.tokens.revocation_cache import GENERATION_KEY, RevocationCache
from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage.memory import MemoryEphemeral
from iam_grpc.storage.ports import Ephemeral
from tests.sessions_helper import until_trusted

TTL = timedelta(minutes=16)


class Source:
    """What SQL says must be in the cache; ``gate`` holds a rebuild mid-way when set."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries
        self.loads = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Sequence[tuple[str, bytes]]:
        self.loads += 1
        if self.gate is not None:
            await self.gate.wait()
        return [(key, b"1") for key in self.entries]


def cache(store: Ephemeral, source: Source, server: list[str] | None = None) -> RevocationCache:
    server = server or [""]
    return RevocationCache(store, source, entry_ttl=TTL, server_id=lambda: server[0])


async def test_an_empty_store_is_rebuilt_and_then_trusted() -> None:
    """First start: no marker, so the entries are written from SQL, then a valid marker."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}", "deny:jti:{b}"])
    replica = cache(store, source)
    assert not replica.trusted
    assert await replica.recover()
    assert replica.trusted
    assert await store.exists(["deny:sid:{a}", "deny:jti:{b}"]) == [True, True]
    marker = await store.get(GENERATION_KEY)
    assert marker is not None
    assert marker.startswith(b"ok:")
    assert replica.rebuilds == 1


async def test_a_second_replica_verifies_the_marker_without_rebuilding() -> None:
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    assert await cache(store, source).recover()
    other = cache(store, source)
    assert await other.recover()
    assert (other.rebuilds, source.loads) == (0, 1)


async def test_a_flushed_store_is_noticed_by_the_marker_and_rebuilt_at_once() -> None:
    """The entries and the marker gone (a restart, a flush): the next check's marker read makes
    the replica untrusted, and recovery starts without waiting for a replay."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    replica = cache(store, source)
    await replica.recover()
    await store.delete(GENERATION_KEY, "deny:sid:{a}")
    assert not replica.accept(await store.get(GENERATION_KEY))
    assert not replica.trusted
    await until_trusted(replica)
    assert await store.exists(["deny:sid:{a}"]) == [True]
    assert replica.rebuilds == 2


async def test_a_marker_of_another_server_is_not_trusted() -> None:
    """Redis restarted from an old snapshot or failed over: the marker names the old server's
    run_id, so the cache is rebuilt for the new one."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    server = ["run-1"]
    replica = cache(store, source, server)
    await replica.recover()
    server[0] = "run-2"
    replica.lost("store server changed")
    await until_trusted(replica)
    marker = await store.get(GENERATION_KEY)
    assert marker is not None
    assert marker.startswith(b"ok:run-2:")
    assert replica.rebuilds == 2


async def test_a_replica_on_another_server_invalidates_a_marker_rebuilt_without_its_writes() -> None:
    """After a failover, replica B reached the new master first and rebuilt it; replica A, still on
    the old master until it noticed, wrote a revocation there (lost). When A notices the new
    server it deletes B's marker, so B stops trusting the cache, and the rebuild has A's entry."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    server = ["new-master"]
    a, b = cache(store, source, server), cache(store, source, server)
    await b.recover()  # B's rebuild on the new master
    await a.recover()
    source.entries.append("deny:sid:{late}")  # A's revocation: in SQL, its entry on the old master
    source.gate = asyncio.Event()
    a.server_changed()
    await asyncio.sleep(0.01)
    assert not b.accept(await store.get(GENERATION_KEY))  # B no longer trusts the cache
    source.gate.set()
    await until_trusted(a)
    await until_trusted(b)
    assert await store.exists(["deny:sid:{late}"]) == [True]


async def test_replicas_wait_for_the_one_that_rebuilds() -> None:
    """While one replica holds the rebuild claim, another does not rebuild too: it trusts the
    cache once the first one's marker is there."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    source.gate = asyncio.Event()
    first, second = cache(store, source), cache(store, source)
    rebuilding = asyncio.create_task(first.recover())
    await asyncio.sleep(0.01)
    assert not await second.recover()  # the claim is held
    source.gate.set()
    assert await rebuilding
    assert await second.recover()
    assert (first.rebuilds, second.rebuilds, source.loads) == (1, 0, 1)


async def test_a_failed_write_invalidates_the_marker_for_everyone_before_the_rebuild() -> None:
    """A replica whose deny-list write failed deletes the marker first, so the other replicas stop
    trusting a cache that lacks the revocation; the rebuild then includes it (SQL has it)."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    writer, reader = cache(store, source), cache(store, source)
    await writer.recover()
    await reader.recover()
    source.entries.append("deny:sid:{new}")  # committed in SQL; its cache write failed
    source.gate = asyncio.Event()
    writer.lost("write failed", force=True)
    await asyncio.sleep(0.01)
    assert not reader.accept(await store.get(GENERATION_KEY))  # claimed by the rebuild: untrusted
    source.gate.set()
    await until_trusted(writer)
    await until_trusted(reader)
    assert await store.exists(["deny:sid:{new}"]) == [True]


async def test_an_invalidation_during_a_rebuild_makes_it_start_over() -> None:
    """The final marker is a compare-and-set on the rebuild's own claim: a deletion meanwhile (a
    failed write elsewhere) fails it, and the rebuild runs again with what SQL holds by then."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    replica = cache(store, source)
    source.gate = asyncio.Event()
    first = asyncio.create_task(replica.recover())
    await asyncio.sleep(0.01)
    await store.delete(GENERATION_KEY)  # another replica's failed write
    source.entries.append("deny:sid:{late}")
    source.gate.set()
    assert not await first
    assert await replica.recover()
    assert await store.exists(["deny:sid:{late}"]) == [True]


async def test_a_failing_store_leaves_the_cache_untrusted_until_it_answers() -> None:
    """Recovery raises BackendUnavailable while the store fails, and the background recovery
    keeps trying until it answers."""

    class Failing(MemoryEphemeral):
        down = True

        async def get(self, key: str) -> bytes | None:
            if self.down:
                raise BackendUnavailable()
            return await super().get(key)

    store, source = Failing(), Source([])
    replica = cache(store, source)
    with pytest.raises(BackendUnavailable):
        await replica.recover()
    replica.lost("store failed")
    await asyncio.sleep(0.2)
    assert not replica.trusted
    store.down = False
    await until_trusted(replica)
    await replica.close()


async def test_refresh_rewrites_entries_and_keeps_the_marker() -> None:
    """The periodic replay rewrites every entry (an evicted one comes back) and keeps an intact
    marker, with its TTL extended."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    replica = cache(store, source)
    await replica.recover()
    marker = await store.get(GENERATION_KEY)
    await store.delete("deny:sid:{a}")
    assert await replica.refresh() == 1
    assert await store.exists(["deny:sid:{a}"]) == [True]
    assert await store.get(GENERATION_KEY) == marker
    assert replica.trusted


async def test_the_marker_is_a_lease_that_trusted_replicas_extend() -> None:
    """A trusted replica extends the marker every quarter lease, so it outlives the lease; once no
    replica extends it (none trusts the cache, or the store stalled longer than the lease) it
    expires, and every replica rebuilds before trusting the cache again."""
    store, source = MemoryEphemeral(), Source(["deny:sid:{a}"])
    lease = timedelta(milliseconds=200)
    replica = RevocationCache(store, source, entry_ttl=TTL, lease=lease)
    assert await replica.recover()
    marker = await store.get(GENERATION_KEY)
    await asyncio.sleep(0.5)
    assert await store.get(GENERATION_KEY) == marker  # extended, unchanged
    await replica.close()  # nobody extends it any more
    replica.lost("stopped")  # (a recovery would start again; cancel it)
    await replica.close()
    await asyncio.sleep(0.3)
    assert await store.get(GENERATION_KEY) is None


async def test_a_failed_extension_keeps_trust_until_the_marker_ends() -> None:
    """A store that fails calls for a while is no sign of lost data: the replica keeps trusting the
    cache (a check that fails reads SQL on its own); if no replica extends the marker for a whole
    lease, the marker ends, and that ends the trust."""

    class Silent(MemoryEphemeral):
        silent = False

        async def compare_and_set(
            self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
        ) -> bool:
            if self.silent:
                raise BackendUnavailable()
            return await super().compare_and_set(key, expected, value, ttl)

    store, source = Silent(), Source([])
    replica = RevocationCache(store, source, entry_ttl=TTL, lease=timedelta(milliseconds=200))
    assert await replica.recover()
    store.silent = True
    await asyncio.sleep(0.12)
    assert replica.trusted  # failed extensions only
    await asyncio.sleep(0.2)
    assert not replica.accept(await store.get(GENERATION_KEY))  # the marker has ended
    assert not replica.trusted
    store.silent = False
    await until_trusted(replica)  # rebuilt
    assert replica.rebuilds == 2
    await replica.close()
