"""Rate limits through the real server, on both backends (behaviour.md 8, S11, S17, S56)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from loguru import logger

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend, start_redis

UNTRUSTED_KEY = "iamk_plain_" + "p" * 43


def fresh_ip() -> str:
    return f"198.51.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = {
        **backend.isolated(),
        "IAM_CALLERS__PLAIN__API_KEY_SHA256": json.dumps(
            [hashlib.sha256(UNTRUSTED_KEY.encode()).hexdigest()]
        ),
        "IAM_CALLERS__PLAIN__METHODS": '["*"]',
    }
    async with running_service(tmp_path_factory.mktemp("limits"), env) as running:
        yield running


async def signup(
    channel: grpc.aio.Channel, ip: str, key: str | None = None
) -> tuple[grpc.StatusCode, object]:
    metadata = (("x-iam-api-key", key),) if key else ()
    request = auth_pb2.SignupRequest(client=common_pb2.ClientContext(ip=ip))
    try:
        await auth_pb2_grpc.AuthServiceStub(channel).Signup(request, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return error.code(), error_details(error)
    return grpc.StatusCode.OK, None


async def test_a_burst_over_an_ip_limit_is_rate_limited_with_retry_info(service: RunningService) -> None:
    """signup.ip allows 2 per second: the third answers RESOURCE_EXHAUSTED RATE_LIMITED with RetryInfo, scope ip."""
    ip = fresh_ip()
    async with service.channel() as channel:
        outcomes = [await signup(channel, ip) for _ in range(3)]
    assert [code for code, _ in outcomes[:2]] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    code, details = outcomes[2]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "RATE_LIMITED"  # type: ignore[attr-defined]
    assert details.metadata == {"scope": "ip"}  # type: ignore[attr-defined]
    assert timedelta(seconds=1) <= details.retry_delay <= timedelta(seconds=2)  # type: ignore[attr-defined]


async def test_limits_of_one_rpc_do_not_touch_another(service: RunningService) -> None:
    """An IP refused for Signup still reaches Login."""
    ip = fresh_ip()
    async with service.channel() as channel:
        for _ in range(3):
            await signup(channel, ip)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(client=common_pb2.ClientContext(ip=ip))
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_untrusted_callers_cannot_choose_the_ip_that_is_counted(service: RunningService) -> None:
    """A caller without trust_client_ip rotating client.ip is counted against its peer address (S56)."""
    async with service.channel() as channel:
        codes = [(await signup(channel, fresh_ip(), UNTRUSTED_KEY))[0] for _ in range(3)]
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]
    await asyncio.sleep(1.1)  # let the peer's 1 s window pass for the other tests


async def test_trusted_callers_relay_the_end_users_ip(service: RunningService) -> None:
    """From a trusted caller, distinct client.ip values are distinct users."""
    async with service.channel() as channel:
        codes = [(await signup(channel, fresh_ip()))[0] for _ in range(6)]
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}


async def test_refusals_and_blocks_are_counted_and_audited(backend: Backend, tmp_path: Path) -> None:
    """A block shows in metrics and as a ratelimit.blocked audit event, with the key hashed.

    signup.ip keeps only its 30 min window here: refusals by the 1 s burst window add no strikes
    (8.1), so a block takes refusals by a window of a minute or more (5 pass, the 6th and 7th
    strike, the second strike blocks)."""
    ip = fresh_ip()
    records: list[str] = []
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": '{"signup.ip": {"windows": ["5/30m"]}}'}
    sink = logger.add(lambda message: records.append(message.record["message"]), level="INFO")
    try:
        async with running_service(tmp_path, env) as service, service.channel() as channel:
            outcomes = [(await signup(channel, ip))[0] for _ in range(8)]
            await service.app.components.audit.drain()  # blocks are audited in the background
            text = service.app.metrics.render().decode()
            async with service.app.components.db.transaction() as tx:
                events = await tx.audit.recent(type_prefix="ratelimit.")
    finally:
        logger.remove(sink)
    assert outcomes == [grpc.StatusCode.INVALID_ARGUMENT] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert 'iam_ratelimit_refusals_total{group="signup.ip"}' in text
    assert 'iam_ratelimit_blocks_total{group="signup.ip"}' in text
    assert "audit event" in records
    blocked = [e for e in events if e.ip == ip]
    assert blocked
    assert blocked[0].type == "ratelimit.blocked"
    assert blocked[0].details["group"] == "signup.ip"
    assert ip not in json.dumps(blocked[0].details)


async def test_exempt_networks_are_never_ip_limited(backend: Backend, tmp_path: Path) -> None:
    """IPs inside ratelimit.exempt_cidrs skip the IP groups."""
    env = {**backend.isolated(), "IAM_RATELIMIT__EXEMPT_CIDRS": '["203.0.113.0/24"]'}
    async with running_service(tmp_path, env) as running, running.channel() as channel:
        codes = {(await signup(channel, "203.0.113.9"))[0] for _ in range(8)}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}


async def test_limits_can_be_tuned_per_group(backend: Backend, tmp_path: Path) -> None:
    """ratelimit.groups overrides one group's windows."""
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": '{"signup.ip": {"windows": ["4/1m"]}}'}
    ip = fresh_ip()
    async with running_service(tmp_path, env) as running, running.channel() as channel:
        codes = [(await signup(channel, ip))[0] for _ in range(5)]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_redis_down_falls_back_to_local_limits(private_redis: tuple[int, Path], tmp_path: Path) -> None:
    """on_store_failure = local: with Redis gone, limits still hold in process memory and a WARNING says so."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = {"IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(message.record["message"]), level="WARNING")
    try:
        async with running_service(tmp_path, env) as running, running.channel() as channel:
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False
            )
            ip = fresh_ip()
            codes = [(await signup(channel, ip))[0] for _ in range(3)]
            fallbacks = running.app.metrics.render().decode()
    finally:
        logger.remove(sink)
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]
    assert "limiter store failed; limiting in process memory" in warnings
    assert "iam_ratelimit_store_fallbacks_total 3.0" in fallbacks


async def test_redis_down_fails_closed_when_configured(
    private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """on_store_failure = closed: limited RPCs answer UNAVAILABLE BACKEND_UNAVAILABLE without Redis."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = {"IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0", "IAM_RATELIMIT__ON_STORE_FAILURE": "closed"}
    async with running_service(tmp_path, env) as running, running.channel() as channel:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)
        code, details = await signup(channel, fresh_ip())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "BACKEND_UNAVAILABLE"  # type: ignore[attr-defined]
