"""Contract of the LimiterStore port on the in-process store and real Redis,
driven with explicit times so both are checked against the same answers."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from iam_grpc.core.ratelimit import parse_window
from iam_grpc.core.ratelimit.groups import Group
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore
from iam_grpc.storage.ports import LimiterStore
from iam_grpc.storage.records import LimitSpec
from iam_grpc.storage.redis import RedisEphemeral, RedisLimiterStore
from tests.conftest import REDIS_TOPOLOGIES, topology_url

T0 = 1_800_000_000_000  # ms; a fixed "now" (2027) so buckets are deterministic
SECOND, MINUTE, HOUR = 1000, 60_000, 3_600_000


def spec(*windows: str, strikes: int = 0, block: int = 0, block_max: int = 0) -> LimitSpec:
    from datetime import timedelta

    group = Group(
        "test",
        "ip",
        tuple(parse_window(w) for w in windows),
        strikes,
        timedelta(milliseconds=block),
        timedelta(milliseconds=block_max),
    )
    return group.spec


@pytest_asyncio.fixture(params=["memory", *REDIS_TOPOLOGIES], loop_scope="session")
async def pair(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[tuple[LimiterStore, object]]:
    if request.param == "memory":
        memory = MemoryEphemeral(max_keys=10_000)
        yield MemoryLimiterStore(memory), memory
        await memory.close()
        return
    url = topology_url(request, request.param)
    redis = RedisEphemeral(url, prefix=redis_prefix + secrets.token_hex(4) + ":")
    yield RedisLimiterStore(redis), redis
    await redis.close()


@pytest.fixture
def store(pair: tuple[LimiterStore, object]) -> LimiterStore:
    return pair[0]


async def test_a_window_allows_its_points_then_refuses_with_the_wait(store: LimiterStore) -> None:
    """2 per second: two pass, the third is refused until the window has slid enough."""
    s = spec("2/1s")
    start = T0 + 100  # 100 ms into a bucket
    assert (await store.hit("k", s, start)).allowed
    assert (await store.hit("k", s, start + 10)).allowed
    refused = await store.hit("k", s, start + 20)
    assert not refused.allowed
    # next bucket starts at +900 ms from start+20 (=880 ms), then 2*(1-f) <= 1 needs f >= 0.5: +500 ms
    assert refused.retry_ms == 880 + 500
    assert not (await store.hit("k", s, start + 20 + refused.retry_ms - 5)).allowed
    assert (await store.hit("k", s, start + 20 + refused.retry_ms)).allowed


async def test_the_previous_bucket_counts_in_proportion(store: LimiterStore) -> None:
    """Sliding estimate: previous bucket x (1 - elapsed fraction) + current bucket."""
    s = spec("10/1m")
    for i in range(10):
        assert (await store.hit("slide", s, T0 + i)).allowed
    bucket_end = (T0 // MINUTE + 1) * MINUTE
    # 30 s into the next bucket the estimate is 10 * 0.5 = 5: five more pass, the sixth not
    results = [await store.hit("slide", s, bucket_end + 30 * SECOND + i) for i in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]


async def test_a_union_refuses_when_any_window_is_full(store: LimiterStore) -> None:
    """1/1s + 3/1h: a burst is refused by the first window, a fourth spaced request by the second."""
    s = spec("1/1s", "3/1h")
    assert (await store.hit("u", s, T0)).allowed
    assert not (await store.hit("u", s, T0 + 100)).allowed
    assert (await store.hit("u", s, T0 + 2 * SECOND)).allowed
    assert (await store.hit("u", s, T0 + 4 * SECOND)).allowed
    slow = await store.hit("u", s, T0 + 6 * SECOND)
    assert not slow.allowed
    assert slow.retry_ms > 30 * MINUTE


async def test_a_refused_union_consumes_nothing(store: LimiterStore) -> None:
    """When one window refuses, the others are not charged."""
    s = spec("1/1s", "3/1h")
    await store.hit("n", s, T0)
    for i in range(5):
        await store.hit("n", s, T0 + 10 + i)  # all refused by the 1/s window
    assert (await store.peek("n", s, T0 + 20))["estimates"][1] == 1.0


async def test_fifty_concurrent_hits_never_overshoot(store: LimiterStore) -> None:
    """One atomic step per check: of 50 concurrent requests against 10/min exactly 10 pass."""
    s = spec("10/1m", "100/1h")
    results = await asyncio.gather(*(store.hit("race", s, T0 + 5) for _ in range(50)))
    assert sum(r.allowed for r in results) == 10


async def test_strikes_block_with_bounded_escalation(store: LimiterStore) -> None:
    """Each block doubles the last (within 24 h), capped at block_max; blocks refuse without striking."""
    s = spec("1/1h", strikes=2, block=10 * SECOND, block_max=40 * SECOND)
    now = T0
    assert (await store.hit("b", s, now)).allowed
    lengths = []
    for _ in range(5):
        first = await store.hit("b", s, now)
        assert not first.allowed
        assert first.new_block_ms == 0
        second = await store.hit("b", s, now)
        assert second.blocked
        lengths.append(second.new_block_ms)
        during = await store.hit("b", s, now + second.new_block_ms - 1)
        assert (during.allowed, during.blocked, during.new_block_ms) == (False, True, 0)
        now += second.new_block_ms
    assert lengths == [10 * SECOND, 20 * SECOND, 40 * SECOND, 40 * SECOND, 40 * SECOND]


async def test_escalation_is_forgotten_after_a_day(store: LimiterStore) -> None:
    """24 h after the last block the next block starts from the base length again."""
    s = spec("1/1s", strikes=1, block=10 * SECOND, block_max=HOUR)
    await store.hit("f", s, T0)
    first = await store.hit("f", s, T0 + 1)
    later = T0 + 25 * HOUR
    await store.hit("f", s, later)
    again = await store.hit("f", s, later + 1)
    assert first.new_block_ms == again.new_block_ms == 10 * SECOND


async def test_refusals_by_burst_windows_add_no_strikes(store: LimiterStore) -> None:
    """A refusal by a burst window (shorter than a minute and than the group's longest) adds no
    strike, however many there are: a double click or a client honouring RetryInfo is not abuse.
    A refusal by a window of a minute or more strikes (here at once: one strike blocks)."""
    s = spec("1/1s", "3/1m", strikes=1, block=MINUTE, block_max=MINUTE)
    assert (await store.hit("k", s, T0)).allowed
    bursts = [await store.hit("k", s, T0 + i) for i in range(1, 50)]
    assert not any(r.allowed or r.blocked for r in bursts)
    assert max(r.retry_ms for r in bursts) <= 2 * SECOND  # the burst window's own wait, no block
    assert (await store.peek("k", s, T0 + 50))["strikes"] == 0
    assert (await store.hit("k", s, T0 + 2 * SECOND)).allowed
    assert (await store.hit("k", s, T0 + 4 * SECOND)).allowed
    refused = await store.hit("k", s, T0 + 6 * SECOND)  # the fourth within the minute
    assert (refused.allowed, refused.blocked, refused.new_block_ms) == (False, True, MINUTE)


async def test_a_groups_only_window_strikes_however_short(store: LimiterStore) -> None:
    """A short window that is the group's only (or longest) one is not a burst window: its
    refusals strike as before (an operator's shortened guard still blocks)."""
    s = spec("2/3s", strikes=1, block=MINUTE, block_max=MINUTE)
    await store.hit("o", s, T0)
    await store.hit("o", s, T0 + 1)
    refused = await store.hit("o", s, T0 + 2)
    assert (refused.allowed, refused.blocked, refused.new_block_ms) == (False, True, MINUTE)


async def test_strikes_expire_with_the_longest_window(store: LimiterStore) -> None:
    """A lone strike long ago does not count toward a block now."""
    s = spec("1/1m", strikes=2, block=MINUTE, block_max=MINUTE)
    await store.hit("s", s, T0)
    assert not (await store.hit("s", s, T0 + 1)).blocked  # strike 1
    later = T0 + 5 * MINUTE
    await store.hit("s", s, later)
    assert not (await store.hit("s", s, later + 1)).blocked  # strike 1 again, not 2


async def test_groups_without_strikes_never_block(store: LimiterStore) -> None:
    """max_strikes 0: refused until the window frees, however often."""
    s = spec("1/1m")
    await store.hit("nb", s, T0)
    results = [await store.hit("nb", s, T0 + i) for i in range(1, 50)]
    assert not any(r.blocked for r in results)
    assert (await store.hit("nb", s, T0 + 3 * MINUTE)).allowed


async def test_refund_gives_back_a_reservation(store: LimiterStore) -> None:
    """A refunded point is available again, from the bucket it was taken from."""
    s = spec("2/1h")
    first = await store.hit("r", s, T0)
    await store.hit("r", s, T0 + 1)
    assert not (await store.hit("r", s, T0 + 2)).allowed
    await store.refund("r", s, T0 + 3, (0,), first.buckets)
    assert (await store.hit("r", s, T0 + 4)).allowed


async def test_reset_forgets_consecutive_failures(store: LimiterStore) -> None:
    """Resetting a window empties it; other windows keep their counts."""
    s = spec("3/1h", "10/1d")
    for i in range(3):
        await store.hit("c", s, T0 + i)
    await store.reset("c", s, T0 + 5, (0,))
    state = await store.peek("c", s, T0 + 6)
    assert state["estimates"] == [0.0, 3.0]
    assert (await store.hit("c", s, T0 + 7)).allowed


async def test_leaving_one_point_ends_the_guard_with_its_block_and_keeps_escalating(
    store: LimiterStore,
) -> None:
    """The login guard's pattern (RateLimiter.leave_one): when a block starts the window is left one
    point short of full, the block and its strike kept; after the block exactly one request passes
    (no fresh allowance), and the next refusal blocks again, doubled."""
    s = spec("3/1h", strikes=1, block=10 * SECOND, block_max=HOUR)
    for _ in range(3):
        assert (await store.hit("g", s, T0)).allowed
    first = await store.hit("g", s, T0)
    assert first.new_block_ms == 10 * SECOND
    await store.leave_one("g", s, T0, (0,))
    assert (await store.hit("g", s, T0 + 1)).blocked  # the block stays
    after = T0 + 10 * SECOND
    assert (await store.hit("g", s, after)).allowed  # one request after the block
    again = await store.hit("g", s, after)
    assert again.new_block_ms == 20 * SECOND  # the strike was kept: the next block doubles


async def test_leave_one_on_an_unknown_key_creates_nothing(store: LimiterStore) -> None:
    s = spec("3/1h", strikes=1, block=10 * SECOND, block_max=HOUR)
    await store.leave_one("nobody", s, T0, (0,))
    assert (await store.peek("nobody", s, T0))["estimates"] == [0.0]


async def test_refund_and_reset_of_unknown_keys_create_nothing(store: LimiterStore) -> None:
    """Giving back or resetting a key that does not exist leaves no state behind."""
    s = spec("3/1h")
    await store.refund("ghost", s, T0, (0,), (T0 // HOUR,))
    await store.reset("ghost", s, T0, (0,))
    assert await store.clear("ghost") is False


async def test_clear_removes_counts_strikes_and_blocks(store: LimiterStore) -> None:
    """An operator's clear lifts a block at once."""
    s = spec("1/1h", strikes=1, block=HOUR, block_max=HOUR)
    await store.hit("x", s, T0)
    assert (await store.hit("x", s, T0 + 1)).blocked
    assert (await store.peek("x", s, T0 + 2))["blocked_ms"] > 0
    assert await store.clear("x") is True
    assert (await store.hit("x", s, T0 + 3)).allowed


async def test_both_stores_give_identical_answers(redis_url: str, redis_prefix: str) -> None:
    """The Lua script and the Python reference agree on a long random sequence of operations."""
    rng = random.Random(20261127)
    memory = MemoryLimiterStore(MemoryEphemeral(max_keys=10_000))
    redis = RedisEphemeral(redis_url, prefix=redis_prefix + "parity" + secrets.token_hex(3) + ":")
    lua = RedisLimiterStore(redis)
    specs = [
        spec("2/1s", "6/1m", strikes=2, block=5 * SECOND, block_max=20 * SECOND),
        spec("2/10s fc"),
        spec("5/1m"),
    ]
    now = T0
    outcomes = {"allowed": 0, "refused": 0, "new_block": 0, "during_block": 0}
    try:
        for step in range(600):
            now += rng.choice([0, 1, 7, 50, 120, 333, 1000, 2500, 15000])
            index = rng.randrange(len(specs))
            key = f"k{index}:{rng.randrange(2)}"
            s = specs[index]
            cost = rng.choice([1, 1, 1, 2])
            left = await memory.hit(key, s, now, cost)
            right = await lua.hit(key, s, now, cost)
            assert left == right, f"step {step}: {left} != {right}"
            outcomes["allowed" if left.allowed else "refused"] += 1
            outcomes["new_block"] += left.new_block_ms > 0
            outcomes["during_block"] += left.blocked and not left.new_block_ms
            if left.allowed and rng.random() < 0.3:
                await memory.refund(key, s, now, (0,), left.buckets, cost)
                await lua.refund(key, s, now, (0,), right.buckets, cost)
            if rng.random() < 0.05:
                await memory.reset(key, s, now, (0,))
                await lua.reset(key, s, now, (0,))
            assert await memory.peek(key, s, now) == await lua.peek(key, s, now)
        # the sequence must have exercised every path, or it proves little
        assert min(outcomes.values()) >= 10, outcomes
    finally:
        await redis.close()


@pytest.mark.parametrize("topology", REDIS_TOPOLOGIES)
async def test_every_redis_limit_key_expires(
    request: pytest.FixtureRequest, redis_prefix: str, topology: str
) -> None:
    """No rl: key ever lives without a TTL, blocked ones included (S11); on a Cluster the scan
    covers every primary."""
    prefix = redis_prefix + "ttl" + secrets.token_hex(3) + ":"
    redis = RedisEphemeral(topology_url(request, topology), prefix=prefix)
    store = RedisLimiterStore(redis)
    s = spec("1/1s", strikes=1, block=HOUR, block_max=24 * HOUR)
    try:
        for i in range(5):
            await store.hit(f"rl:{{g:{i}}}", s, T0)
            await store.hit(f"rl:{{g:{i}}}", s, T0 + 1)
            first = await store.hit(f"rl:{{g:{i}}}", s, T0)
            await store.refund(f"rl:{{g:{i}}}", s, T0, (0,), first.buckets or (T0 // SECOND,))
            await store.reset(f"rl:{{g:{i}}}", s, T0, (0,))
        keys = [key async for key in redis.client.scan_iter(match=prefix + "*")]
        assert len(keys) == 5  # one per limited key, found on whichever node holds it
        for key in keys:
            assert await redis.client.pttl(key) > 0
    finally:
        await redis.close()
