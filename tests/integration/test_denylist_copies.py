"""Each worker's in-memory deny-list copy (issue 14), with two replicas on one MariaDB and one
Redis: revocations reach the other replica within the staleness bound, a cache that lost data
is rebuilt from SQL and every copy reloads it, and a copy that lost its feed reads per call or
refuses, as configured. Checks answered from a current copy cost no Redis round trip."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import jwt

from iam_grpc.core.tokens.revocation_cache import GENERATION_KEY
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.integration.test_tokens import client
from tests.sessions_helper import NO_ANOMALY_CHECKS, new_session

BOUND = 1.0  # tokens.denylist_staleness set below
# the copy is off by default; the event poller's statements would be counted with the checks'
COPY = {"IAM_TOKENS__DENYLIST_STALENESS": "1s", "IAM_EVENTS__POLL_INTERVAL": "1h"}


async def verify(service: RunningService, token: str) -> str:
    """'OK' or the ErrorInfo reason (the status name without one)."""
    async with service.channel() as channel:
        try:
            await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=token)
            )
        except grpc.aio.AioRpcError as error:
            return error_details(error).reason or error.code().name
    return "OK"


async def refused_within(service: RunningService, token: str, reason: str, seconds: float) -> float:
    """Poll until ``service`` answers ``reason`` for ``token``; how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (answer := await verify(service, token)) != reason:
        assert answer == "OK", answer
        assert loop.time() - started < seconds, f"still {answer} after {seconds} s"
        await asyncio.sleep(0.01)
    return loop.time() - started


async def test_revocations_reach_the_other_replica_within_the_bound_from_memory(
    shared_backend: Backend, tmp_path: Path
) -> None:
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS, **COPY}
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        mirror_b = b.app.components.denylist.mirror
        assert mirror_b is not None
        assert mirror_b.current()  # loaded before SERVING
        sessions = [(await new_session(a.app))[1] for _ in range(3)]
        for s in sessions:
            assert await verify(b, s.access_token) == "OK"
        redis_b = b.app.components.stores.redis
        assert redis_b is not None
        statements = b.app.metrics.sql_statements._value.get()
        # a check answered from B's copy: no SQL, no fallback
        for _ in range(20):
            assert await verify(b, sessions[0].access_token) == "OK"
        assert b.app.metrics.sql_statements._value.get() == statements
        assert b.app.metrics.denylist_fallbacks._value.get() == 0

        # a session ended on A (Logout), a single token revoked on A
        async with a.channel() as on_a:
            await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=sessions[0].refresh_token)
            )
        assert await verify(a, sessions[0].access_token) == "SESSION_REVOKED"  # at once on A
        took = await refused_within(b, sessions[0].access_token, "SESSION_REVOKED", BOUND)
        jti = jwt.decode(sessions[1].access_token, options={"verify_signature": False})["jti"]
        async with a.app.components.db.transaction() as tx:
            await a.app.components.denylist.record_tokens(tx, [jti])
        await a.app.components.denylist.revoke_tokens([jti])
        took_jti = await refused_within(b, sessions[1].access_token, "TOKEN_INVALID", BOUND)
        assert await verify(b, sessions[2].access_token) == "OK"
        print(
            "revocation reached replica B after", round(took * 1000), "ms and", round(took_jti * 1000), "ms"
        )


async def test_a_cache_that_lost_data_is_rebuilt_from_sql_and_every_copy_reloads(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """A revocation that reached SQL only (its cache write and feed change lost, as in a Redis
    failover to a replica that missed them), then the marker lost: both replicas' copies reload
    from SQL and refuse the session; none accepts it once the loss is known."""
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS, **COPY}
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        _, session = await new_session(a.app)
        assert await verify(b, session.access_token) == "OK"
        reloads = [s.app.components.denylist.mirror.reloads for s in (a, b)]  # type: ignore[union-attr]
        async with a.app.components.db.transaction() as tx:
            await tx.sessions.revoke(session.session_id, "test", a.app.clock.now())
        await a.app.components.ephemeral.delete(GENERATION_KEY)  # the data loss becomes known
        for service in (a, b):
            await refused_within(service, session.access_token, "SESSION_REVOKED", BOUND + 3.0)
        for service, before in zip((a, b), reloads, strict=True):
            mirror = service.app.components.denylist.mirror
            assert mirror is not None
            for _ in range(500):  # the cache is rebuilt, then the copy reloads under its new marker
                if mirror.reloads > before and mirror.current():
                    break
                await asyncio.sleep(0.01)
            assert mirror.reloads > before
            assert mirror.current()
            assert await verify(service, session.access_token) == "SESSION_REVOKED"  # from the copy


async def test_a_copy_that_lost_its_feed_reads_per_call_or_refuses(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """Past the bound without a successful read of the feed, A (``per_call``) asks the shared
    cache for each check, and so sees a revocation the feed never brought it; B (``refuse``)
    answers BACKEND_UNAVAILABLE."""
    environ = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS, **COPY}
    refusing = {**environ, "IAM_TOKENS__DENYLIST_STALE": "refuse"}
    async with (
        running_service(tmp_path / "a", environ) as a,
        running_service(tmp_path / "b", refusing) as b,
    ):
        _, session = await new_session(a.app)
        _, other = await new_session(a.app)
        for service in (a, b):
            mirror = service.app.components.denylist.mirror
            assert mirror is not None
            await mirror.close()  # the feed is lost from now on
        await asyncio.sleep(BOUND + 0.2)
        assert await verify(a, session.access_token) == "OK"
        async with b.channel() as on_b:  # B's own revocation: written to the shared cache
            await auth_pb2_grpc.AuthServiceStub(on_b).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=session.refresh_token)
            )
        assert await verify(a, session.access_token) == "SESSION_REVOKED"
        assert await verify(b, other.access_token) == "BACKEND_UNAVAILABLE"
