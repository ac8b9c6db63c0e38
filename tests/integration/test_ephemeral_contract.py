"""Contract of the Ephemeral port, run against the in-process store and real Redis: one server,
a three-node Redis Cluster and a master behind Sentinel."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio

from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage.memory import MemoryEphemeral
from iam_grpc.storage.ports import Ephemeral
from iam_grpc.storage.redis import RedisEphemeral
from tests.conftest import REDIS_TOPOLOGIES, topology_url
from tests.served import free_port

LONG = timedelta(seconds=60)
SHORT = timedelta(seconds=1)


@pytest_asyncio.fixture(params=["memory", *REDIS_TOPOLOGIES], loop_scope="session")
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Ephemeral]:
    if request.param == "memory":
        memory = MemoryEphemeral(max_keys=1000)
        yield memory
        await memory.close()
        return
    url = topology_url(request, request.param)
    redis = RedisEphemeral(url, prefix=redis_prefix + secrets.token_hex(4) + ":")
    yield redis
    await redis.close()


async def test_get_returns_what_set_stored(store: Ephemeral) -> None:
    """set then get returns the bytes; a missing key reads as None."""
    await store.set("a", b"value", LONG)
    assert await store.get("a") == b"value"
    assert await store.get("missing") is None


async def gone(store: Ephemeral, key: str, within: float = 3.0) -> bool:
    """Poll until ``key`` has expired (bounded), so slow CI machines do not make TTL tests flaky."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if not (await store.exists([key]))[0]:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_values_expire_after_their_ttl(store: Ephemeral) -> None:
    """A value is gone once its TTL has passed."""
    await store.set("short", b"x", SHORT)
    assert await store.get("short") == b"x"
    assert await gone(store, "short")


async def test_ttl_reports_remaining_lifetime(store: Ephemeral) -> None:
    """ttl is positive and at most what was set; None for a missing key."""
    await store.set("t", b"x", timedelta(seconds=10))
    remaining = await store.ttl("t")
    assert remaining is not None
    assert timedelta(seconds=9) < remaining <= timedelta(seconds=10)
    assert await store.ttl("nope") is None


async def test_zero_ttl_is_refused(store: Ephemeral) -> None:
    """Nothing may be stored without a lifetime."""
    with pytest.raises(ValueError, match="TTL"):
        await store.set("forever", b"x", timedelta(0))


async def test_set_if_absent_stores_only_once(store: Ephemeral) -> None:
    """The first set_if_absent wins; later ones leave the value alone."""
    assert await store.set_if_absent("once", b"first", LONG) is True
    assert await store.set_if_absent("once", b"second", LONG) is False
    assert await store.get("once") == b"first"


async def test_set_if_absent_is_atomic_under_concurrency(store: Ephemeral) -> None:
    """Of 50 concurrent claims exactly one succeeds."""
    results = await asyncio.gather(*(store.set_if_absent("race", str(i).encode(), LONG) for i in range(50)))
    assert results.count(True) == 1


async def test_set_if_absent_works_again_after_expiry(store: Ephemeral) -> None:
    """An expired mark no longer blocks a new one."""
    assert await store.set_if_absent("mark", b"1", SHORT)
    assert await gone(store, "mark")
    assert await store.set_if_absent("mark", b"2", LONG)


async def test_get_and_delete_returns_the_value_once(store: Ephemeral) -> None:
    """A single-use value can be taken exactly once, even by concurrent takers."""
    await store.set("grant", b"g", LONG)
    results = await asyncio.gather(*(store.get_and_delete("grant") for _ in range(20)))
    assert [r for r in results if r is not None] == [b"g"]
    assert await store.get("grant") is None


async def test_compare_and_set_replaces_only_the_expected_value(store: Ephemeral) -> None:
    """compare_and_set fails on a mismatch or a missing key and succeeds on a match."""
    assert await store.compare_and_set("state", b"pending", b"done") is False
    await store.set("state", b"pending", LONG)
    assert await store.compare_and_set("state", b"approved", b"done") is False
    assert await store.compare_and_set("state", b"pending", b"done") is True
    assert await store.get("state") == b"done"


async def test_delete_if_removes_only_the_expected_value(store: Ephemeral) -> None:
    """delete_if leaves a missing key or another value alone and deletes a match, once."""
    assert await store.delete_if("lock", b"mine") is False
    await store.set("lock", b"theirs", LONG)
    assert await store.delete_if("lock", b"mine") is False
    assert await store.get("lock") == b"theirs"
    await store.set("lock", b"mine", LONG)
    assert await store.delete_if("lock", b"mine") is True
    assert await store.get("lock") is None
    assert await store.delete_if("lock", b"mine") is False


async def test_compare_and_set_keeps_the_ttl_unless_given(store: Ephemeral) -> None:
    """Without a ttl the old lifetime is kept; with one it is replaced."""
    await store.set("cas", b"a", timedelta(seconds=5))
    assert await store.compare_and_set("cas", b"a", b"b")
    kept = await store.ttl("cas")
    assert kept is not None
    assert kept <= timedelta(seconds=5)
    assert await store.compare_and_set("cas", b"b", b"c", timedelta(seconds=50))
    replaced = await store.ttl("cas")
    assert replaced is not None
    assert replaced > timedelta(seconds=40)


async def test_compare_and_set_has_one_winner(store: Ephemeral) -> None:
    """Two replicas moving pending -> done: exactly one wins."""
    await store.set("challenge", b"pending", LONG)
    results = await asyncio.gather(
        *(store.compare_and_set("challenge", b"pending", b"done") for _ in range(30))
    )
    assert results.count(True) == 1


async def test_incr_counts_and_keeps_the_first_ttl(store: Ephemeral) -> None:
    """Counters start at zero with the ttl of their first increment, which later increments do not extend."""
    assert await store.incr("count", 1, timedelta(seconds=5)) == 1
    assert await store.incr("count", 2, timedelta(seconds=500)) == 3
    assert await store.incr("count", -1, timedelta(seconds=500)) == 2
    remaining = await store.ttl("count")
    assert remaining is not None
    assert remaining <= timedelta(seconds=5)


async def test_incr_is_atomic_under_concurrency(store: Ephemeral) -> None:
    """50 concurrent increments give 50."""
    await asyncio.gather(*(store.incr("many", 1, LONG) for _ in range(50)))
    assert await store.incr("many", 0, LONG) == 50


async def test_counters_expire(store: Ephemeral) -> None:
    """A counter starts over after its window."""
    await store.incr("window", 5, SHORT)
    assert await gone(store, "window")
    assert await store.incr("window", 1, LONG) == 1


async def test_delete_and_exists(store: Ephemeral) -> None:
    """delete removes keys and reports how many existed; exists checks several keys at once."""
    await store.set("k1", b"1", LONG)
    await store.set("k2", b"2", LONG)
    assert await store.exists(["k1", "k2", "k3"]) == [True, True, False]
    assert await store.delete("k1", "k3") == 1
    assert await store.exists(["k1", "k2"]) == [False, True]
    assert await store.exists([]) == []
    assert await store.delete() == 0


async def test_get_many_returns_values_in_order_with_none_for_missing(store: Ephemeral) -> None:
    """get_many answers every key in the order asked, None where a key does not exist."""
    await store.set("{many}:a", b"1", LONG)
    await store.set("{many}:c", b"3", LONG)
    assert await store.get_many(["{many}:c", "{many}:b", "{many}:a", "{many}:c"]) == [b"3", None, b"1", b"3"]


async def test_get_many_refuses_keys_of_different_hash_tags(store: Ephemeral) -> None:
    """One MGET must stay in one Cluster slot: every store refuses a mix of hash tags, so a caller
    that would fail on a Cluster fails on any backend."""
    with pytest.raises(ValueError, match="hash tag"):
        await store.get_many(["{a}:1", "{b}:1"])
    with pytest.raises(ValueError, match="hash tag"):
        await store.get_many(["plain-1", "plain-2"])


async def test_get_many_of_no_keys_is_empty(store: Ephemeral) -> None:
    """Asking for nothing answers nothing (and is not an error)."""
    assert await store.get_many([]) == []


async def test_get_many_reads_counters_as_decimal_bytes(store: Ephemeral) -> None:
    """A counter written by incr reads back as its decimal text, as get would give it."""
    await store.incr("{count}:1", 7, LONG)
    await store.incr("{count}:2", -2, LONG)
    assert await store.get_many(["{count}:1", "{count}:2"]) == [b"7", b"-2"]
    assert await store.get("{count}:1") == b"7"


async def test_get_many_does_not_see_expired_keys(store: Ephemeral) -> None:
    """An expired key reads as None in get_many too."""
    await store.set("{exp}:short", b"x", SHORT)
    await store.set("{exp}:long", b"y", LONG)
    assert await gone(store, "{exp}:short")
    assert await store.get_many(["{exp}:short", "{exp}:long"]) == [None, b"y"]


async def test_ping_answers_while_the_store_does(store: Ephemeral) -> None:
    """A healthy store answers ping; a Redis store whose server is gone raises BackendUnavailable
    (the in-process store cannot be gone)."""
    assert await store.ping() is None
    if isinstance(store, RedisEphemeral):
        gone_server = RedisEphemeral(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=SHORT)
        try:
            with pytest.raises(BackendUnavailable):
                await gone_server.ping()
        finally:
            await gone_server.close()


async def test_redis_down_is_backend_unavailable() -> None:
    """An unreachable Redis raises BackendUnavailable, not a driver error."""
    dead = RedisEphemeral(
        "redis://127.0.0.1:1/0",
        connect_timeout=timedelta(milliseconds=200),
        socket_timeout=timedelta(milliseconds=200),
    )
    with pytest.raises(BackendUnavailable):
        await dead.get("x")
    with pytest.raises(BackendUnavailable):
        await dead.set_if_absent("x", b"1", LONG)
    await dead.close()


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://127.0.0.1:{port},127.0.0.1:{port}", "redis+sentinel://127.0.0.1:{port}/iam"],
    ids=["cluster", "sentinel"],
)
async def test_a_cluster_or_sentinel_that_does_not_answer_is_backend_unavailable(url: str) -> None:
    """No seed node or no sentinel answers: BackendUnavailable, from commands and from ping."""
    dead = RedisEphemeral(
        url.format(port=free_port()),
        connect_timeout=timedelta(milliseconds=200),
        socket_timeout=timedelta(milliseconds=200),
    )
    try:
        with pytest.raises(BackendUnavailable):
            await dead.get("x")
        with pytest.raises(BackendUnavailable):
            await dead.set_many([("{x}:1", b"1")], LONG)
        with pytest.raises(BackendUnavailable):
            await dead.ping()
    finally:
        await dead.close()


async def test_get_many_on_a_redis_that_is_down_is_backend_unavailable() -> None:
    """get_many fails like every other operation when Redis does not answer."""
    dead = RedisEphemeral(
        "redis://127.0.0.1:1/0",
        connect_timeout=timedelta(milliseconds=200),
        socket_timeout=timedelta(milliseconds=200),
    )
    with pytest.raises(BackendUnavailable):
        await dead.get_many(["{x}:1", "{x}:2"])
    await dead.close()


async def test_values_reads_keys_of_any_slot_in_order(store: Ephemeral) -> None:
    """values reads keys of different hash tags in one call, None for a missing or expired key."""
    await store.set("{a}:x", b"1", LONG)
    await store.set("{b}:y", b"2", LONG)
    await store.set("{c}:short", b"3", SHORT)
    assert await gone(store, "{c}:short")
    assert await store.values(["{b}:y", "{nope}:z", "{a}:x", "{c}:short"]) == [b"2", None, b"1", None]
    assert await store.values([]) == []


async def test_set_many_stores_every_item_with_the_ttl(store: Ephemeral) -> None:
    """set_many stores each (key, value), more than one pipeline's worth, all with the given TTL."""
    items = [(f"{{m{i}}}:k", str(i).encode()) for i in range(2500)]
    await store.set_many(items, LONG)
    await store.set_many([], LONG)
    assert await store.values([key for key, _ in items]) == [value for _, value in items]
    ttl = await store.ttl(items[-1][0])
    assert ttl is not None
    assert timedelta(seconds=55) < ttl <= LONG
    await store.set_many([("{m0}:k", b"again")], SHORT)
    assert await store.get("{m0}:k") == b"again"
    assert await gone(store, "{m0}:k")


async def test_a_redis_that_keeps_failing_fails_at_once() -> None:
    """After three connection failures the breaker opens: calls fail without touching the network,
    while ping (the health probe) still asks the server."""
    dead = RedisEphemeral(
        "redis://127.0.0.1:1/0",
        connect_timeout=timedelta(milliseconds=200),
        socket_timeout=timedelta(milliseconds=200),
    )
    try:
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await dead.get("x")
        assert dead.breaker.is_open
        with pytest.raises(BackendUnavailable) as refused:
            await dead.values(["x"])
        assert refused.value.__cause__ is None  # refused by the breaker, no driver error behind it
        with pytest.raises(BackendUnavailable) as probed:
            await dead.ping()
        assert probed.value.__cause__ is not None
    finally:
        await dead.close()


async def test_extend_renews_a_lease_only_while_it_holds_the_value(store: Ephemeral) -> None:
    """extend gives the key a new TTL while it holds the expected value, and nothing else."""
    await store.set("lease", b"mine", SHORT)
    assert await store.extend("lease", b"mine", LONG)
    ttl = await store.ttl("lease")
    assert ttl is not None
    assert ttl > timedelta(seconds=50)
    assert not await store.extend("lease", b"theirs", LONG)
    assert not await store.extend("missing", b"mine", LONG)
    assert await store.get("lease") == b"mine"


async def test_extend_is_tried_past_an_open_breaker(redis_url: str, redis_prefix: str) -> None:
    """A breaker opened by failures (here: forced) makes other calls fail at once, but a lease is
    still extended, so a Redis that is only slow does not end it."""
    redis = RedisEphemeral(redis_url, prefix=redis_prefix + secrets.token_hex(4) + ":")
    try:
        await redis.set("lease", b"mine", SHORT)
        for _ in range(3):
            redis.breaker.failed()
        assert redis.breaker.is_open
        with pytest.raises(BackendUnavailable):
            await redis.get("lease")
        assert await redis.extend("lease", b"mine", LONG)
    finally:
        await redis.close()
