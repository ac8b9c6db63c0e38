"""The limiter over the in-process store on an injected clock: every default
group's escalation is bounded, retry delays are honest, keys cannot be dodged."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

import pytest

from iam_grpc.clock import ManualClock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit import DEFAULT_GROUPS, RateLimiter, email_key, ip_key, pair_key, parse_window
from iam_grpc.errors import RateLimited
from iam_grpc.metrics import Metrics
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore

KIND_SAMPLES = {
    "ip": "192.0.2.10",
    "email": "jane@example.com",
    "ip_email": "192.0.2.10|jane@example.com",
    "user": "01JABCDEFGHJKMNPQRSTVWXYZ0",
    "session": "01JABCDEFGHJKMNPQRSTVWXYZ1",
    "token": "h" * 43,
    "link": "j" * 22,
    "device": "dev_" + "d" * 22,
    "challenge": "ch_" + "c" * 22,
    "caller": "bff",
}


def limiter(clock: ManualClock, **kwargs: object) -> tuple[RateLimiter, MemoryEphemeral]:
    memory = MemoryEphemeral(max_keys=100_000, clock=clock)
    return (
        RateLimiter(
            MemoryLimiterStore(memory),
            groups=DEFAULT_GROUPS,
            material=SecretMaterial(bytes(32)),
            clock=clock,
            metrics=Metrics(),
            **kwargs,  # type: ignore[arg-type]
        ),
        memory,
    )


async def exhaust(rl: RateLimiter, group: str, key: str) -> RateLimited:
    """Hit until refused; return the refusal."""
    for _ in range(10_000):
        try:
            await rl.hit(group, key)
        except RateLimited as refusal:
            return refusal
    raise AssertionError(f"{group} never refused")


async def block(
    rl: RateLimiter, clock: ManualClock, name: str, key: str, *, hits: int = 100_000
) -> tuple[RateLimited, dict[str, Any]]:
    """Hit until the group blocks the key (a group without strikes: until it refuses), waiting out
    refusals of the per-second burst windows as a client honouring RetryInfo does: those add no
    strikes (8.1), so a block comes from the longer windows. The last refusal and the state."""
    group = rl.group(name)
    for _ in range(hits):
        try:
            await rl.hit(name, key)
        except RateLimited as refusal:
            state = await rl.peek(name, key)
            if state["blocked_ms"] or not group.max_strikes:
                return refusal, state
            if refusal.retry_after <= timedelta(seconds=2):  # a burst window's wait
                clock.advance(refusal.retry_after)
    raise AssertionError(f"{name} did not block within {hits} hits")


@pytest.mark.parametrize("name", sorted(DEFAULT_GROUPS))
async def test_ten_escalations_of_every_group_stay_within_block_max(name: str) -> None:
    """Drive repeated blocks of each group: no block is longer than block_max, and every key expires (S11)."""
    clock = ManualClock()
    rl, memory = limiter(clock)
    group = DEFAULT_GROUPS[name]
    key = KIND_SAMPLES[group.key]
    for _ in range(10):
        refusal, state = await block(rl, clock, name, key)
        blocked = timedelta(milliseconds=state["blocked_ms"])
        if group.max_strikes:
            assert timedelta(0) < blocked <= group.block_max
        else:
            assert blocked == timedelta(0)
        assert refusal.retry_after >= timedelta(seconds=1)
        remaining = await memory.ttl(rl.store_key(group, key))
        assert remaining is not None
        assert remaining <= max(
            2 * max(w.length for w in group.windows), group.block_max, timedelta(days=1)
        ) + timedelta(seconds=1)
        clock.advance(refusal.retry_after)
    clock.advance(timedelta(days=3))
    assert memory.sweep() >= 1
    assert len(memory) == 0


@pytest.mark.parametrize("name", sorted(DEFAULT_GROUPS))
async def test_retry_info_is_within_a_second_of_the_real_wait(name: str) -> None:
    """RATE_LIMITED carries a RetryInfo of at least 1 s that is at most 1 s too long (S17)."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    key = KIND_SAMPLES[DEFAULT_GROUPS[name].key]
    refusal = await exhaust(rl, name, key)
    retry = refusal.retry_after
    assert retry >= timedelta(seconds=1)
    assert refusal.metadata == {"scope": DEFAULT_GROUPS[name].key}
    probe, _ = limiter(clock)  # an identical limiter state is rebuilt to probe the moment just before
    await exhaust(probe, name, key)
    if retry > timedelta(seconds=1):
        clock.advance(retry - timedelta(seconds=1))
        with pytest.raises(RateLimited):
            await probe.hit(name, key)
        clock.advance(timedelta(seconds=1))
    else:
        clock.advance(retry)
    await rl.hit(name, key)


async def test_a_block_in_one_group_never_affects_another() -> None:
    """An IP blocked for Refresh still signs up and logs in, and those calls are counted (S11)."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    ip = "198.51.100.7"
    _, state = await block(rl, clock, "refresh.ip", ip)
    assert state["blocked_ms"] > 0
    permits = [await rl.hit("login.ip", ip), await rl.hit("signup.ip", ip)]
    assert [bool(permit.buckets) for permit in permits] == [True, True]  # counted, not waved through
    with pytest.raises(RateLimited):
        await rl.hit("refresh.ip", ip)


async def test_ipv6_addresses_of_one_64_share_a_key() -> None:
    """Two addresses in one /64 count together; another /64 does not (S13)."""
    assert ip_key("2001:db8:1:2::1") == ip_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    clock = ManualClock()
    rl, _ = limiter(clock)
    for _ in range(10):
        await rl.hit("login.ip", ip_key("2001:db8:1:2::1"))
    with pytest.raises(RateLimited):
        await rl.hit("login.ip", ip_key("2001:db8:1:2::abcd"))
    await rl.hit("login.ip", ip_key("2001:db8:1:3::1"))


async def test_case_and_unicode_variants_of_an_address_share_a_key() -> None:
    """Variants of one address hit one login.pair counter (S13)."""
    variants = ["Jane@Example.com", " jane@example.com", "ＪＡＮＥ@example.com", "jane@EXAMPLE.COM"]
    assert len({email_key(v) for v in variants}) == 1
    assert len({pair_key("192.0.2.1", v) for v in variants}) == 1


async def test_failure_reservations_are_returned_on_success() -> None:
    """login.pair: 30 successes in an hour consume no failure budget; 4 failures, a success, 4 failures pass (S12)."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    key = pair_key("192.0.2.1", "jane@example.com")
    for _ in range(30):
        permit = await rl.hit("login.pair", key)
        await permit.succeeded()
        clock.advance(2)
    assert (await rl.peek("login.pair", key))["estimates"][1] == 0
    for outcome in ["fail"] * 4 + ["ok"] + ["fail"] * 4:
        permit = await rl.hit("login.pair", key)
        if outcome == "ok":
            await permit.succeeded()
        else:
            await permit.failed()
        clock.advance(2)
    state = await rl.peek("login.pair", key)
    assert state["estimates"][1] == pytest.approx(4, abs=0.01)  # the success reset the first four
    assert (state["strikes"], state["blocked_ms"]) == (0, 0)


async def test_the_sixth_failure_in_an_hour_is_refused() -> None:
    """Five failures are allowed, the sixth is RATE_LIMITED, and the slot frees with time (S8)."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    key = pair_key("192.0.2.1", "jane@example.com")
    for _ in range(5):
        await (await rl.hit("login.pair", key)).failed()
        clock.advance(2)
    with pytest.raises(RateLimited) as refused:
        await rl.hit("login.pair", key)
    clock.advance(refused.value.retry_after)
    await (await rl.hit("login.pair", key)).succeeded()


async def test_exempt_networks_skip_ip_groups_only() -> None:
    """An exempt IP is never limited by ip groups, while its pair groups still count."""
    clock = ManualClock()
    rl, _ = limiter(clock, exempt=[ipaddress.ip_network("10.0.0.0/8")])
    for _ in range(500):
        await rl.hit("login.ip", "10.1.2.3")
    for _ in range(3):
        await rl.hit("signup.email", "x@example.com")
    with pytest.raises(RateLimited):
        await rl.hit("signup.email", "x@example.com")


async def test_disabled_limiting_never_refuses() -> None:
    """ratelimit.enabled = false turns every group off: nothing is counted, nothing stored."""
    clock = ManualClock()
    rl, memory = limiter(clock, enabled=False)
    permits = [await rl.hit("signup.ip", "192.0.2.1") for _ in range(100)]
    assert {permit.buckets for permit in permits} == {()}
    assert len(memory) == 0
    enabled, _ = limiter(clock)
    assert (await exhaust(enabled, "signup.ip", "192.0.2.1")).metadata == {"scope": "ip"}


async def test_stored_keys_reveal_neither_group_input_nor_address() -> None:
    """Keys are rl:{group:keyed-hash}: the address is not readable and each group has its own key."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    key = rl.store_key(DEFAULT_GROUPS["login.ip"], "192.0.2.1")
    assert key.startswith("rl:{login.ip:")
    assert "192.0.2.1" not in key
    assert key != rl.store_key(DEFAULT_GROUPS["signup.ip"], "192.0.2.1").replace("signup.ip", "login.ip")


def test_window_syntax() -> None:
    """Windows read '10/1s', '100/10m', '5/1h fc'."""
    window = parse_window("5/1h fc")
    assert (window.points, window.length, window.failures, window.consecutive) == (
        5,
        timedelta(hours=1),
        True,
        True,
    )
    assert str(window) == "5/1h fc"
    with pytest.raises(ValueError, match="windows look like"):
        parse_window("five per hour")


async def test_a_refund_gives_back_one_reservation_and_keeps_the_failures_before_it() -> None:
    """Permit.refund (an attempt that never happened) returns its point; unlike a success it does
    not reset the consecutive-failure count of login.pair."""
    clock = ManualClock()
    rl, _ = limiter(clock)
    key = pair_key("192.0.2.1", "jane@example.com")
    for _ in range(3):
        await (await rl.hit("login.pair", key)).failed()
        clock.advance(2)
    await (await rl.hit("login.pair", key)).refund()
    assert (await rl.peek("login.pair", key))["estimates"][1] == pytest.approx(3, abs=0.01)
    clock.advance(2)
    await (await rl.hit("login.pair", key)).succeeded()
    assert (await rl.peek("login.pair", key))["estimates"][1] == 0


async def test_a_refund_the_store_cannot_take_does_not_fail_the_call() -> None:
    """A store that fails between a reservation and its refund (Redis stalled in between): the
    refund is skipped and counted, the caller's success stands, and the point stays consumed (a
    stricter limit, never a looser one). Before, a Login that had succeeded answered
    BACKEND_UNAVAILABLE (seen in the fault suite's Redis stall)."""
    from iam_grpc.errors import BackendUnavailable

    class FailsLater(MemoryLimiterStore):
        failing = False

        async def refund(self, *args: object, **kwargs: object) -> None:
            if self.failing:
                raise BackendUnavailable()
            await super().refund(*args, **kwargs)  # type: ignore[arg-type]

    clock = ManualClock()
    store = FailsLater(MemoryEphemeral(max_keys=1000, clock=clock))
    metrics = Metrics()
    rl = RateLimiter(
        store, groups=DEFAULT_GROUPS, material=SecretMaterial(bytes(32)), clock=clock, metrics=metrics
    )
    permit = await rl.hit("login.ip_fail", ip_key("192.0.2.10"))
    store.failing = True
    await rl.settle(permit, success=True)
    assert metrics.registry.get_sample_value("iam_ratelimit_store_fallbacks_total") == 1
    state = await rl.peek("login.ip_fail", ip_key("192.0.2.10"))
    assert state["estimates"][0] >= 1  # still counted
