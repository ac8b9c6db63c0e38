"""Risk score (behaviour.md 3.3) on the in-process store and real Redis, on a
manual clock: points add up per ip and device in hourly buckets, the larger
score counts, old hours stop counting, and a failing store never breaks the
caller."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from loguru import logger

from iam_grpc.clock import ManualClock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit import RateLimiter, parse_window
from iam_grpc.core.ratelimit.groups import Group
from iam_grpc.core.risk import POINTS, RiskScores, limiter_hook
from iam_grpc.errors import RateLimited
from iam_grpc.metrics import Metrics
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore
from iam_grpc.storage.ports import Ephemeral, LimiterStore
from iam_grpc.storage.redis import RedisEphemeral, RedisLimiterStore
from tests.conftest import start_redis

IP = "192.0.2.7"
DEVICE = "dev_" + "A" * 22
HOUR = timedelta(hours=1)


@pytest.fixture
def clock() -> ManualClock:
    """Half past the hour, so bucket edges are crossed by whole-hour moves of the clock."""
    return ManualClock(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))


@pytest.fixture
def material() -> SecretMaterial:
    return SecretMaterial(secrets.token_bytes(32))


@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="session")
async def store(
    request: pytest.FixtureRequest, clock: ManualClock, redis_url: str, redis_prefix: str
) -> AsyncIterator[Ephemeral]:
    if request.param == "memory":
        memory = MemoryEphemeral(max_keys=10_000, clock=clock)
        yield memory
        await memory.close()
        return
    redis = RedisEphemeral(redis_url, prefix=redis_prefix + secrets.token_hex(4) + ":")
    yield redis
    await redis.close()


@pytest.fixture
def scores(store: Ephemeral, material: SecretMaterial, clock: ManualClock) -> RiskScores:
    return RiskScores(store, material, clock)


def limiter_store(store: Ephemeral) -> LimiterStore:
    """The limiter on the same backend as the risk score, as the application wires them."""
    if isinstance(store, RedisEphemeral):
        return RedisLimiterStore(store)
    assert isinstance(store, MemoryEphemeral)
    return MemoryLimiterStore(store)


GROUPS = {
    name: Group(name, kind, (parse_window("1/1h"),), max_strikes=2, block=HOUR, block_max=HOUR)
    for name, kind in (("t.ip", "ip"), ("t.email", "email"), ("t.pair", "ip_email"), ("t.device", "device"))
}


def limiter_with_hook(
    store: Ephemeral, scores: RiskScores, material: SecretMaterial, clock: ManualClock
) -> RateLimiter:
    return RateLimiter(
        limiter_store(store),
        groups=GROUPS,
        material=material,
        clock=clock,
        metrics=Metrics(),
        on_refusal=limiter_hook(scores),
    )


async def refusals(limiter: RateLimiter, group: str, key: str, hits: int) -> int:
    refused = 0
    for _ in range(hits):
        try:
            await limiter.hit(group, key)
        except RateLimited:
            refused += 1
    return refused


@pytest.fixture
def risk_warnings() -> Iterator[list[dict[str, Any]]]:
    """WARNING records of the risk component, as loguru hands them to sinks."""
    records: list[dict[str, Any]] = []
    sink = logger.add(
        lambda message: records.append(dict(message.record)),
        level="WARNING",
        filter=lambda record: record["extra"].get("logger") == "iam.risk",
    )
    yield records
    logger.remove(sink)


def current_buckets(material: SecretMaterial, clock: ManualClock) -> list[str]:
    """The keys of this hour's buckets of IP and DEVICE, spelled out as behaviour.md section 0 has them."""
    hour = int(clock.now().timestamp()) // 3600
    ip_h = material.keyed_hash("ratelimit", IP)[:32]
    return [f"risk:ip:{{{ip_h}}}:{hour}", f"risk:dev:{{{DEVICE}}}:{hour}"]


def dead_store() -> RedisEphemeral:
    return RedisEphemeral(
        "redis://127.0.0.1:1/0",
        connect_timeout=timedelta(milliseconds=200),
        socket_timeout=timedelta(milliseconds=200),
    )


# adding and reading -----------------------------------------------------------------


async def test_points_add_up_per_subject(scores: RiskScores) -> None:
    """Two failed logins and a wrong code give 3 + 3 + 5 to both the ip and the device."""
    for event in ("failed_login", "failed_login", "wrong_code"):
        ip_points, device_points = POINTS[event]
        await scores.add(ip=IP, device_id=DEVICE, ip_points=ip_points, device_points=device_points)
    assert await scores.score(ip=IP, device_id=None) == 11
    assert await scores.score(ip=None, device_id=DEVICE) == 11


async def test_unknown_subjects_score_zero(scores: RiskScores) -> None:
    """An ip or device with no points scores 0, and asking about nobody is 0 too."""
    assert await scores.score(ip="198.51.100.1", device_id="dev_" + "B" * 22) == 0
    assert await scores.score(ip=None, device_id=None) == 0


async def test_the_larger_of_ip_and_device_score_wins(scores: RiskScores) -> None:
    """The score is max(ip, device), not their sum, whichever side is larger."""
    await scores.add(ip=IP, ip_points=7)
    await scores.add(device_id=DEVICE, device_points=POINTS["token_reuse"][1])
    assert await scores.score(ip=IP, device_id=DEVICE) == 25
    await scores.add(ip=IP, ip_points=30)
    assert await scores.score(ip=IP, device_id=DEVICE) == 37


async def test_points_of_the_last_24_hours_count_and_older_ones_do_not(
    scores: RiskScores, clock: ManualClock
) -> None:
    """A bucket counts through its 24th hour (the current one included) and not in the 25th."""
    await scores.add(ip=IP, device_id=DEVICE, ip_points=5, device_points=5)
    clock.advance(HOUR)
    await scores.add(ip=IP, ip_points=1)
    clock.advance(22 * HOUR)
    assert await scores.score(ip=IP, device_id=None) == 6
    assert await scores.score(ip=None, device_id=DEVICE) == 5
    clock.advance(HOUR)
    assert await scores.score(ip=IP, device_id=None) == 1
    assert await scores.score(ip=None, device_id=DEVICE) == 0
    clock.advance(HOUR)
    assert await scores.score(ip=IP, device_id=DEVICE) == 0


async def test_a_shorter_window_forgets_sooner(
    store: Ephemeral, material: SecretMaterial, clock: ManualClock
) -> None:
    """window_hours sets how many hourly buckets are summed."""
    scores = RiskScores(store, material, clock, window_hours=2)
    await scores.add(ip=IP, ip_points=4)
    clock.advance(HOUR)
    assert await scores.score(ip=IP, device_id=None) == 4
    clock.advance(HOUR)
    assert await scores.score(ip=IP, device_id=None) == 0


async def test_ipv6_addresses_of_one_64_share_a_score(scores: RiskScores) -> None:
    """Rotating addresses inside one /64 does not shed points; another /64 has its own score."""
    await scores.add(ip="2001:db8:1:2::1", ip_points=3)
    await scores.add(ip="2001:db8:1:2:ffff:ffff:ffff:fffe", ip_points=3)
    assert await scores.score(ip="2001:db8:1:2:abcd::9", device_id=None) == 6
    assert await scores.score(ip="2001:db8:1:3::1", device_id=None) == 0


async def test_buckets_live_under_the_documented_keys_for_25_hours(
    scores: RiskScores, store: Ephemeral, material: SecretMaterial, clock: ManualClock
) -> None:
    """risk:ip:{<32-char keyed hash>}:<hour> and risk:dev:{<device>}:<hour>, each with a 25 h TTL."""
    await scores.add(ip=IP, device_id=DEVICE, ip_points=1, device_points=1)
    for key in current_buckets(material, clock):
        remaining = await store.ttl(key)
        assert remaining is not None
        assert timedelta(hours=24, minutes=59) < remaining <= timedelta(hours=25)


async def test_concurrent_additions_are_not_lost(scores: RiskScores) -> None:
    """Fifty replicas adding at once give fifty times the points."""
    await asyncio.gather(
        *(scores.add(ip=IP, device_id=DEVICE, ip_points=2, device_points=1) for _ in range(50))
    )
    assert await scores.score(ip=IP, device_id=None) == 100
    assert await scores.score(ip=None, device_id=DEVICE) == 50


async def test_zero_points_and_missing_subjects_write_nothing(
    scores: RiskScores, store: Ephemeral, material: SecretMaterial, clock: ManualClock
) -> None:
    """add with no points or no subject leaves no bucket behind."""
    await scores.add(ip=IP, device_id=DEVICE)
    await scores.add(ip_points=5, device_points=5)
    await scores.add(ip="", device_id="", ip_points=5, device_points=5)
    assert await store.exists(current_buckets(material, clock)) == [False, False]


async def test_negative_points_are_refused(scores: RiskScores) -> None:
    """Points only grow; lowering a score is reset_device's job."""
    with pytest.raises(ValueError, match="negative"):
        await scores.add(ip=IP, ip_points=-1)


def test_a_window_under_one_hour_is_refused(
    store: Ephemeral, material: SecretMaterial, clock: ManualClock
) -> None:
    """The window is checked when the scores are built."""
    with pytest.raises(ValueError, match="one hour"):
        RiskScores(store, material, clock, window_hours=0)


async def test_reset_device_clears_the_device_only(scores: RiskScores, clock: ManualClock) -> None:
    """After reset_device the device scores 0 (older hours included) while the ip keeps its points."""
    await scores.add(ip=IP, device_id=DEVICE, ip_points=3, device_points=3)
    clock.advance(5 * HOUR)
    await scores.add(ip=IP, device_id=DEVICE, ip_points=25, device_points=25)
    other = "dev_" + "C" * 22
    await scores.add(device_id=other, device_points=4)
    await scores.reset_device(DEVICE)
    assert await scores.score(ip=None, device_id=DEVICE) == 0
    assert await scores.score(ip=IP, device_id=None) == 28
    assert await scores.score(ip=IP, device_id=DEVICE) == 28
    assert await scores.score(ip=None, device_id=other) == 4


# the limiter hook ---------------------------------------------------------------------


async def test_limiter_refusals_add_2_and_a_block_adds_10_more(
    store: Ephemeral, scores: RiskScores, material: SecretMaterial, clock: ManualClock
) -> None:
    """1/1h with 2 strikes: refusal (+2), blocking refusal (+2 +10), refusal while blocked (+2)."""
    limiter = limiter_with_hook(store, scores, material, clock)
    assert await refusals(limiter, "t.ip", IP, 4) == 3
    assert await scores.score(ip=IP, device_id=None) == 2 + (2 + 10) + 2


async def test_a_refusal_by_an_ip_block_alone_adds_2(
    store: Ephemeral, scores: RiskScores, material: SecretMaterial, clock: ManualClock
) -> None:
    """ensure_not_blocked refusing an ip is a limiter rejection too."""
    limiter = limiter_with_hook(store, scores, material, clock)
    await refusals(limiter, "t.ip", IP, 3)
    before = await scores.score(ip=IP, device_id=None)
    assert before is not None
    with pytest.raises(RateLimited):
        await limiter.ensure_not_blocked("t.ip", IP)
    assert await scores.score(ip=IP, device_id=None) == before + 2


async def test_the_hook_scores_the_64_of_an_ipv6_key(
    store: Ephemeral, scores: RiskScores, material: SecretMaterial, clock: ManualClock
) -> None:
    """The limiter's raw ip key (an IPv6 /64) lands on the score of every address in it."""
    limiter = limiter_with_hook(store, scores, material, clock)
    await refusals(limiter, "t.ip", "2001:db8:7:7::/64", 2)
    assert await scores.score(ip="2001:db8:7:7::42", device_id=None) == 2


async def test_refusals_of_other_key_kinds_add_nothing(
    store: Ephemeral, scores: RiskScores, material: SecretMaterial, clock: ManualClock
) -> None:
    """Email, ip+email and device groups block without touching any ip's score."""
    limiter = limiter_with_hook(store, scores, material, clock)
    assert await refusals(limiter, "t.email", "jane@example.com", 4) == 3
    assert await refusals(limiter, "t.pair", f"{IP}|jane@example.com", 4) == 3
    assert await refusals(limiter, "t.device", DEVICE, 4) == 3
    assert await scores.score(ip=IP, device_id=DEVICE) == 0
    assert await scores.score(ip="jane@example.com", device_id=None) == 0
    assert await scores.score(ip=f"{IP}|jane@example.com", device_id=None) == 0


async def test_a_failing_hook_still_answers_rate_limited(
    store: Ephemeral, material: SecretMaterial, clock: ManualClock
) -> None:
    """Whatever the hook raises, the caller gets RATE_LIMITED and nothing else."""

    async def broken(group: Group, raw_key: str, new_block: bool) -> None:
        raise RuntimeError("hook bug")

    limiter = RateLimiter(
        limiter_store(store),
        groups=GROUPS,
        material=material,
        clock=clock,
        metrics=Metrics(),
        on_refusal=broken,
    )
    assert await refusals(limiter, "t.ip", IP, 4) == 3
    with pytest.raises(RateLimited):
        await limiter.ensure_not_blocked("t.ip", IP)


# a failing store ------------------------------------------------------------------------


async def test_an_unreachable_store_makes_score_none_and_add_silent(
    material: SecretMaterial, clock: ManualClock, risk_warnings: list[dict[str, Any]]
) -> None:
    """Redis at a closed port: score is None, add and reset_device return quietly and log once."""
    dead = dead_store()
    scores = RiskScores(dead, material, clock)
    try:
        assert await scores.score(ip=IP, device_id=DEVICE) is None
        assert await scores.score(ip=IP, device_id=None) is None
        await scores.add(ip=IP, device_id=DEVICE, ip_points=3, device_points=3)
        await scores.reset_device(DEVICE)
    finally:
        await dead.close()
    assert [record["message"] for record in risk_warnings] == ["risk points not recorded"]
    extra = risk_warnings[0]["extra"]
    assert extra["error"] == "BackendUnavailable"
    assert DEVICE not in repr(risk_warnings)


async def test_the_limiter_answers_rate_limited_when_the_risk_store_is_down(
    material: SecretMaterial, clock: ManualClock
) -> None:
    """Refusals still answer RATE_LIMITED when the hook's store is unreachable."""
    memory = MemoryEphemeral(max_keys=1000, clock=clock)
    dead = dead_store()
    try:
        limiter = limiter_with_hook(memory, RiskScores(dead, material, clock), material, clock)
        assert await refusals(limiter, "t.ip", IP, 4) == 3
    finally:
        await dead.close()


async def test_a_redis_that_stops_makes_score_none_until_it_returns(
    private_redis: tuple[int, Path], material: SecretMaterial, clock: ManualClock
) -> None:
    """Points counted before Redis stops; while down, score is None and add does not raise."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    redis = RedisEphemeral(f"redis://127.0.0.1:{port}/0")
    scores = RiskScores(redis, material, clock)
    try:
        await scores.add(ip=IP, device_id=DEVICE, ip_points=3, device_points=5)
        assert await scores.score(ip=IP, device_id=DEVICE) == 5
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)
        assert await scores.score(ip=IP, device_id=DEVICE) is None
        await scores.add(ip=IP, device_id=DEVICE, ip_points=3, device_points=5)
        await scores.reset_device(DEVICE)
        start_redis(port, folder)
        await asyncio.sleep(0.3)
        assert await scores.score(ip=IP, device_id=DEVICE) == 0  # a restarted Redis without persistence
    finally:
        await redis.close()
