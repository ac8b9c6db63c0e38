"""Token behaviour that needs several replicas or a failing store (S24, S31):
two services on one MariaDB and one Redis, and a Redis of the test's own."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import error_details, running_service
from tests.conftest import Backend, start_redis
from tests.integration.test_tokens import client
from tests.sessions_helper import NO_ANOMALY_CHECKS, new_session


async def verify(channel: grpc.aio.Channel, token: str) -> str:
    """'OK' or the ErrorInfo reason."""
    try:
        await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=token)
        )
    except grpc.aio.AioRpcError as error:
        return error_details(error).reason or error.code().name
    return "OK"


async def test_revocation_on_one_replica_is_seen_by_the_other_within_the_bound(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """Logout on replica A; VerifyAccessToken on A answers SESSION_REVOKED at once, on replica B
    within ``tokens.denylist_staleness`` (the suite's 200 ms, asserted under the default 1 s: B
    answers from its in-memory copy, S24)."""
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS}
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        _, session = await new_session(a.app)
        async with a.channel() as on_a, b.channel() as on_b:
            assert await verify(on_b, session.access_token) == "OK"
            await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=session.refresh_token)
            )
            revoked_at = asyncio.get_running_loop().time()
            assert await verify(on_a, session.access_token) == "SESSION_REVOKED"
            while await verify(on_b, session.access_token) != "SESSION_REVOKED":
                assert asyncio.get_running_loop().time() - revoked_at < 1.0
                await asyncio.sleep(0.01)


async def test_concurrent_refreshes_over_two_replicas_converge(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """10 parallel refreshes of one token split over two replicas: one successor, session alive (S31)."""
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS, "IAM_REFRESH_GRACE_SECONDS": "5"}
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        _, session = await new_session(a.app)
        async with a.channel() as on_a, b.channel() as on_b:
            stubs = [token_pb2_grpc.TokenServiceStub(c) for c in (on_a, on_b)]
            request = token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
            answers = await asyncio.gather(*(stubs[i % 2].Refresh(request) for i in range(10)))
        assert len({x.session.refresh_token for x in answers}) == 1
        assert len({x.session.access_token for x in answers}) == 1
        async with a.app.components.db.transaction() as tx:
            assert [t.generation for t in await tx.sessions.tokens_of(session.session_id)] == [0, 1]


async def test_reuse_detected_on_one_replica_revokes_everywhere(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """Rotate on A, replay the old token on B after grace: REFRESH_TOKEN_REUSED, and A refuses the successor."""
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS, "IAM_REFRESH_GRACE_SECONDS": "1"}
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        _, session = await new_session(a.app)
        async with a.channel() as on_a, b.channel() as on_b:
            stub_a, stub_b = token_pb2_grpc.TokenServiceStub(on_a), token_pb2_grpc.TokenServiceStub(on_b)
            rotated = (
                await stub_a.Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
                )
            ).session
            await asyncio.sleep(1.3)
            with pytest.raises(grpc.aio.AioRpcError) as replay:
                await stub_b.Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
                )
            assert error_details(replay.value).reason == "REFRESH_TOKEN_REUSED"
            with pytest.raises(grpc.aio.AioRpcError) as successor:
                await stub_a.Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=rotated.refresh_token)
                )
            assert error_details(successor.value).reason == "SESSION_REVOKED"
            revoked_at = asyncio.get_running_loop().time()  # A's deny-list copy: within its bound
            while await verify(on_a, rotated.access_token) != "SESSION_REVOKED":
                assert asyncio.get_running_loop().time() - revoked_at < 1.0
                await asyncio.sleep(0.01)


async def redis_service(private_redis: tuple[int, Path], tmp_path: Path, extra: dict[str, str]):  # type: ignore[no-untyped-def]
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    return port, running_service(tmp_path, {"IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0", **extra})


async def test_with_redis_down_revoked_tokens_stay_revoked(
    private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """The deny-list falls back to SQL: a logged-out session's access token is still SESSION_REVOKED (S57)."""
    port, service = await redis_service(private_redis, tmp_path, {})
    async with service as iam, iam.channel() as channel:
        _, ended = await new_session(iam.app)
        _, alive = await new_session(iam.app)
        await auth_pb2_grpc.AuthServiceStub(channel).Logout(
            auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token)
        )
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)
        assert await verify(channel, ended.access_token) == "SESSION_REVOKED"
        await asyncio.sleep(1.3)  # past tokens.denylist_staleness: the worker's copy is not current
        assert await verify(channel, ended.access_token) == "SESSION_REVOKED"
        assert await verify(channel, alive.access_token) == "OK"
        assert iam.app.metrics.denylist_fallbacks._value.get() >= 2


async def test_with_redis_down_and_fallback_closed_checks_fail_clearly(
    private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """tokens.denylist_fallback = closed: without the store, VerifyAccessToken is UNAVAILABLE BACKEND_UNAVAILABLE."""
    port, service = await redis_service(private_redis, tmp_path, {"IAM_TOKENS__DENYLIST_FALLBACK": "closed"})
    async with service as iam, iam.channel() as channel:
        _, session = await new_session(iam.app)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)
        await asyncio.sleep(1.3)  # past tokens.denylist_staleness: the worker's copy is not current
        assert await verify(channel, session.access_token) == "BACKEND_UNAVAILABLE"
