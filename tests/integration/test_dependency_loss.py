"""Losing a dependency (docs/deployment.md, "Losing a dependency"): Redis down or restarted empty,
MariaDB stalled. Each test is one defect that was measured on two replicas under load, against a
Redis of the test's own and MariaDB behind a TCP proxy of the test's own (the shared servers are
never stopped). The fault suite (tests/faults) runs the same faults under a steady mixed load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from iam_grpc.app import Application
from iam_grpc.core.tokens.denylist import sid_key
from iam_grpc.errors import BackendUnavailable
from iam_grpc.ids import new_refresh_token
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import NO_BURSTS, PASSWORD, client, failure, new_email, signup
from tests.conftest import Backend, start_redis
from tests.e2e.test_admin_cli import cli
from tests.integration.test_tokens_shared import verify
from tests.sessions_helper import FIREFOX, IPHONE, new_session, new_user
from tests.tcp_proxy import TcpProxy, tcp_proxy

IP = "198.51.100.10"  # where tests.sessions_helper.new_session signs in


def redis_env(backend: Backend, port: int, **extra: str) -> dict[str, str]:
    return {
        **backend.isolated(),
        "IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "IAM_RATELIMIT__GROUPS": json.dumps({**NO_BURSTS, "login.pair": {"windows": ["1000/1h fc"]}}),
        **extra,
    }


def stop_redis(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)


async def restart_empty(port: int, folder: Path) -> None:
    stop_redis(port)
    await asyncio.sleep(0.2)
    start_redis(port, folder)
    await asyncio.sleep(0.3)


def sample(app: Application, name: str, labels: dict[str, str] | None = None) -> float:
    return app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def refresh_request(token: str, device_id: str, ip: str = IP) -> token_pb2.RefreshRequest:
    return token_pb2.RefreshRequest(
        client=client(ip=ip, ua=FIREFOX, device_id=device_id), refresh_token=token
    )


@asynccontextmanager
async def replicas(*environs: dict[str, str], folder: Path) -> AsyncIterator[list[RunningService]]:
    async with running_service(folder / "a", environs[0]) as a:
        if len(environs) == 1:
            yield [a]
            return
        async with running_service(folder / "b", environs[1]) as b:
            yield [a, b]


# 1. Refresh (and Login's pending challenge) with Redis down ----------------------------------------


async def test_refresh_with_its_checks_works_while_redis_is_down(
    shared_own_database: Backend, private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """Redis down: Refresh with every anomaly check on rotates (the pending-challenge lookup fails
    open and is counted, the risk check is skipped and counted, limits run locally); Logout works;
    Login from a trusted device opens a session, and one that needs an MFA code answers
    BACKEND_UNAVAILABLE (a challenge cannot live without the store), counted, never INTERNAL.
    Before, every Refresh answered UNAVAILABLE."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    async with replicas(redis_env(shared_own_database, port), folder=tmp_path) as (iam,):
        app = iam.app
        _, session = await new_session(app)
        _, ending = await new_session(app)
        email = new_email()
        async with iam.channel() as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            trusted = await signup(auth, email)
            stop_redis(port)

            rotated = await tokens.Refresh(refresh_request(session.refresh_token, session.device_id))
            assert rotated.WhichOneof("result") == "session"
            again = await tokens.Refresh(refresh_request(rotated.session.refresh_token, session.device_id))
            assert again.WhichOneof("result") == "session"
            assert await verify(channel, again.session.access_token) == "OK"
            assert sample(app, "iam_check_fallbacks_total", {"check": "pending_challenge"}) >= 2
            assert sample(app, "iam_check_fallbacks_total", {"check": "risk_score"}) >= 2

            await auth.Logout(auth_pb2.LogoutRequest(client=client(), refresh_token=ending.refresh_token))
            assert await verify(channel, ending.access_token) == "SESSION_REVOKED"

            login = await auth.Login(
                auth_pb2.LoginRequest(
                    client=client(device_id=trusted.device_id), email=email, password=PASSWORD
                )
            )
            assert login.WhichOneof("result") == "session"
            code, details = await failure(
                auth.Login(auth_pb2.LoginRequest(client=client(ua=IPHONE), email=email, password=PASSWORD))
            )
            assert (code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
            assert sample(app, "iam_check_fallbacks_total", {"check": "pending_login"}) == 1
        assert sample(app, "iam_rpc_total", {"method": "/iam.v1.TokenService/Refresh", "code": "OK"}) == 2


# 2. Revocations survive Redis restarting empty -----------------------------------------------------


async def test_revoked_sessions_stay_revoked_when_redis_restarts_empty(
    shared_own_database: Backend, private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """Logout on replica A; Redis restarts empty; from the first call after the restart, on A and
    on B (which saw no failure at all), the token answers SESSION_REVOKED: the missing generation
    marker makes both read SQL, and the deny-list is rebuilt from SQL at once (not at the next
    replay, which is an hour away here). Before, it verified OK until the replay."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = redis_env(shared_own_database, port, IAM_TOKENS__DENYLIST_REPLAY="1h")
    async with replicas(env, env, folder=tmp_path) as (a, b):
        _, ended = await new_session(a.app)
        _, alive = await new_session(a.app)
        async with a.channel() as on_a, b.channel() as on_b:
            await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token)
            )
            assert await verify(on_b, ended.access_token) == "SESSION_REVOKED"
            await restart_empty(port, folder)
            seen = []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # every answer from the restart on, on both replicas
                seen += [await verify(on_a, ended.access_token), await verify(on_b, ended.access_token)]
                assert await verify(on_b, alive.access_token) == "OK"
            assert set(seen) == {"SESSION_REVOKED"}, seen
        for replica in (a, b):
            assert replica.app.components.denylist.cache.trusted  # rebuilt (by one) and verified (by both)
        assert (
            sample(a.app, "iam_denylist_rebuilds_total") + sample(b.app, "iam_denylist_rebuilds_total") >= 1
        )
        assert await a.app.components.ephemeral.exists([sid_key(ended.session_id)]) == [True]


def redis_pid(port: int) -> int:
    info = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "server"], capture_output=True, text=True
    ).stdout
    return int(next(line for line in info.splitlines() if line.startswith("process_id:")).split(":")[1])


@pytest.mark.parametrize("stall", [0.6, 4.0], ids=["shorter-than-the-lease", "longer-than-the-lease"])
async def test_a_logout_during_a_redis_stall_is_refused_everywhere_after_it(
    shared_own_database: Backend, private_redis: tuple[int, Path], tmp_path: Path, stall: float
) -> None:
    """Redis stops answering (SIGSTOP) and a session is logged out on replica A meanwhile; B makes
    no call during the stall. Once the Logout has answered and Redis answers again, the token
    answers SESSION_REVOKED on both, from the first call: a stall shorter than the generation
    marker's lease (3 s) holds the Logout until its entry is stored; a longer one lets the marker
    expire, so both replicas rebuild from SQL before trusting the cache again (the Logout answers
    after about 3 s, during the stall). Before, B trusted the cache again without the entry."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = redis_env(shared_own_database, port, IAM_TOKENS__DENYLIST_REPLAY="1h")
    async with replicas(env, env, folder=tmp_path) as (a, b):
        _, ended = await new_session(a.app)
        pid = redis_pid(port)
        async with a.channel() as on_a, b.channel() as on_b:
            assert await verify(on_b, ended.access_token) == "OK"
            os.kill(pid, signal.SIGSTOP)
            stalled = time.monotonic()
            answered: list[float] = []
            try:
                logout = asyncio.ensure_future(
                    auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                        auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token), timeout=10
                    )
                )
                logout.add_done_callback(lambda _: answered.append(time.monotonic() - stalled))
                await asyncio.sleep(stall)
            finally:
                os.kill(pid, signal.SIGCONT)
            await logout
            seen = [await verify(on_b, ended.access_token), await verify(on_a, ended.access_token)]
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                seen.append(await verify(on_b, ended.access_token))
        assert set(seen) == {"SESSION_REVOKED"}, seen
        assert answered[0] < 4.0, (
            answered
        )  # the longer stall: Logout answered (after the lease) before it ended


# 3. Single-token revocations are durable ---------------------------------------------------------------


async def test_roles_revoke_now_is_durable_through_redis_loss(
    shared_own_database: Backend, private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """`roles revoke --now` records the user's current access tokens in SQL (revocations) and in
    the cache: they answer TOKEN_INVALID at once, while Redis is down (the SQL fallback reads the
    jti) and after it restarts empty; the sessions live on and the next Refresh mints a token
    without the role. Before, only deny:jti keys were written, so the tokens verified again."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = redis_env(shared_own_database, port, IAM_TOKENS__DENYLIST_REPLAY="1h")
    async with replicas(env, folder=tmp_path) as (iam,):
        user = await new_user(iam.app, roles=("auditor",))
        _, session = await new_session(iam.app, user)
        async with iam.channel() as channel:
            assert await verify(channel, session.access_token) == "OK"
            result = await cli(
                {**env, "IAM_DATA_DIR": str(tmp_path)}, "roles", "revoke", user.id, "auditor", "--now"
            )
            assert result.returncode == 0, result.stderr
            assert await verify(channel, session.access_token) == "TOKEN_INVALID"
            stop_redis(port)
            assert await verify(channel, session.access_token) == "TOKEN_INVALID"
            start_redis(port, folder)
            await asyncio.sleep(0.3)
            for _ in range(20):
                assert await verify(channel, session.access_token) == "TOKEN_INVALID"
                await asyncio.sleep(0.05)
            fresh = await token_pb2_grpc.TokenServiceStub(channel).Refresh(
                refresh_request(session.refresh_token, session.device_id)
            )
            answer = await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=fresh.session.access_token)
            )
            assert list(answer.roles) == ["user"]
        async with iam.app.components.db.transaction(read_only=True) as tx:
            recorded = await tx.revocations.active(iam.app.clock.now())
        assert ("jti", _jti(session.access_token)) in recorded


def _jti(token: str) -> str:
    import base64

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


# 4. Stale connections after a Redis restart --------------------------------------------------------


async def test_a_restarted_redis_costs_no_call_a_fallback(
    shared_own_database: Backend, private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """Calls in parallel fill the Redis pool; Redis restarts; the next parallel calls each meet a
    dead pooled connection, reconnect once and succeed: no limiter check falls back to process
    memory and no risk check is skipped. Before, every dead connection failed its first command."""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    async with replicas(redis_env(shared_own_database, port), folder=tmp_path) as (iam,):
        app = iam.app
        sessions = [(await new_session(app))[1] for _ in range(8)]
        async with iam.channel() as channel:
            tokens = token_pb2_grpc.TokenServiceStub(channel)

            async def refresh_all(chain: list[str]) -> list[str]:
                answers = await asyncio.gather(
                    *(
                        tokens.Refresh(refresh_request(t, s.device_id))
                        for t, s in zip(chain, sessions, strict=True)
                    )
                )
                return [a.session.refresh_token for a in answers]

            chain = await refresh_all([s.refresh_token for s in sessions])
            await restart_empty(port, folder)
            limiter_fallbacks = sample(app, "iam_ratelimit_store_fallbacks_total")
            risk_skipped = sample(app, "iam_check_fallbacks_total", {"check": "risk_score"})
            await refresh_all(chain)
        assert sample(app, "iam_ratelimit_store_fallbacks_total") == limiter_fallbacks
        assert sample(app, "iam_check_fallbacks_total", {"check": "risk_score"}) == risk_skipped


# 5. MariaDB stalled: fail fast, no churn ---------------------------------------------------------------


@pytest.fixture
def mariadb_proxy(shared_own_database: Backend) -> Iterator[tuple[TcpProxy, dict[str, str]]]:
    url = make_url(shared_own_database.environ["IAM_DATABASE_URL"])
    with tcp_proxy(url.host or "127.0.0.1", url.port or 3306) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield proxy, {**shared_own_database.environ, "IAM_DATABASE_URL": through}


async def test_a_stalled_database_fails_calls_fast_without_churning_the_pool(
    mariadb_proxy: tuple[TcpProxy, dict[str, str]], tmp_path: Path
) -> None:
    """MariaDB stalls (the proxy holds every byte): Refresh calls, 20 in parallel for 8 s, each
    end within 3 s (database.statement_timeout = 2 s, then the breaker answers at once) with
    UNAVAILABLE BACKEND_UNAVAILABLE; once the breaker is open one connection at a time is
    tried. Once the stall ends, calls work again within a few seconds. Before, calls hung to their
    5 s deadline and the pool opened and dropped a connection per call."""
    proxy, env = mariadb_proxy
    env = {**env, "IAM_RATELIMIT__GROUPS": json.dumps({"refresh.ip": {"windows": ["100000/1s"]}})}
    async with replicas(env, folder=tmp_path) as (iam,):
        _, session = await new_session(iam.app)
        async with iam.channel() as channel:
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            await tokens.Refresh(refresh_request(session.refresh_token, session.device_id))  # a warm pool
            proxy.stall()
            opened_before = proxy.accepted
            durations: list[float] = []
            outcomes: set[tuple[grpc.StatusCode, str]] = set()

            async def caller() -> None:
                end = time.monotonic() + 8
                while time.monotonic() < end:
                    started = time.monotonic()
                    unknown = refresh_request(
                        new_refresh_token(), session.device_id
                    )  # one per call: no limit
                    code, details = await failure(tokens.Refresh(unknown, timeout=5))
                    durations.append(time.monotonic() - started)
                    outcomes.add((code, details.reason))

            async def count_late_connections() -> int:
                await asyncio.sleep(3)  # by now the breaker is open
                settled = proxy.accepted
                await asyncio.sleep(5)
                return proxy.accepted - settled

            *_, late = await asyncio.gather(*(caller() for _ in range(20)), count_late_connections())
            opened = proxy.accepted - opened_before
            proxy.restore()
            recovered_at = None
            started = time.monotonic()
            while time.monotonic() - started < 10:
                try:
                    fresh = (await new_session(iam.app))[1]
                    await tokens.Refresh(refresh_request(fresh.refresh_token, fresh.device_id), timeout=5)
                    recovered_at = time.monotonic() - started
                    break
                except (grpc.aio.AioRpcError, BackendUnavailable):  # still recovering
                    await asyncio.sleep(0.1)
    assert outcomes == {(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")}, outcomes
    assert max(durations) < 3.0, sorted(durations)[-5:]  # statement_timeout 2 s, on a busy machine
    assert len(durations) > 100  # most answered at once (the breaker), not after a time-out
    assert opened <= 20 + 8, opened  # the pool's 20 at the start, then one probe at a time
    assert late <= 5, late  # over 5 s once the breaker is open: its probe, one try at a time
    assert recovered_at is not None
    assert recovered_at < 3.0, recovered_at


# health and metrics tell the truth --------------------------------------------------------------------


def _healthz(app: Application) -> dict[str, object]:
    assert app.http is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/healthz", timeout=5) as answer:
        return dict(json.loads(answer.read()))


async def healthz(app: Application) -> dict[str, object]:
    """GET /healthz from another thread (the service answers on this test's event loop)."""
    return await asyncio.to_thread(_healthz, app)


async def test_healthz_and_metrics_report_each_dependency(
    mariadb_proxy: tuple[TcpProxy, dict[str, str]], private_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """/healthz and iam_dependency_state say up, degraded or down per dependency within a few
    seconds: Redis down leaves the service SERVING (fallbacks answer) with redis ``down``; the
    database cut turns sql ``down``; both come back ``up`` once they answer and the recent
    failure is past."""
    proxy, env = mariadb_proxy
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = {**env, "IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    async with running_service(tmp_path, env, probe_interval=0.5) as iam:
        app = iam.app
        assert await healthz(app) == {"status": "SERVING", "dependencies": {"sql": "up", "redis": "up"}}
        stop_redis(port)
        await dependencies_become(app, {"sql": "up", "redis": "down"}, within=3)
        assert (await healthz(app))["status"] == "SERVING"
        assert sample(app, "iam_dependency_state", {"dependency": "redis", "state": "down"}) == 1
        assert sample(app, "iam_dependency_state", {"dependency": "redis", "state": "up"}) == 0
        start_redis(port, folder)
        await dependencies_become(app, {"sql": "up", "redis": "degraded"}, within=3)
        proxy.cut()
        await dependencies_become(app, {"sql": "down", "redis": "degraded"}, within=3)
        proxy.restore()
        await dependencies_become(app, {"sql": "degraded", "redis": "degraded"}, within=3)
        await dependencies_become(app, {"sql": "up", "redis": "up"}, within=15)


async def dependencies_become(app: Application, wanted: dict[str, str], *, within: float) -> None:
    deadline = time.monotonic() + within
    seen: object = None
    while (seen := (await healthz(app))["dependencies"]) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"not {wanted} within {within} s: {seen}")
        await asyncio.sleep(0.1)


async def test_a_retried_logout_writes_the_deny_list_again(backend: Backend, tmp_path: Path) -> None:
    """A replica that died between Logout's commit and its deny-list write leaves the session
    revoked in SQL and its token verifying from the cache; the client's retry (on any replica)
    answers OK as before and now writes the entry, so the token is refused from then on. Before,
    a Logout of an already-revoked session wrote nothing."""
    async with running_service(tmp_path, backend.isolated()) as iam, iam.channel() as channel:
        _, session = await new_session(iam.app)
        async with iam.app.components.db.transaction() as tx:  # the commit of the Logout whose replica died
            assert await tx.sessions.revoke(session.session_id, "logout", iam.app.clock.now())
        assert await verify(channel, session.access_token) == "OK"  # the cache never heard of it
        await auth_pb2_grpc.AuthServiceStub(channel).Logout(
            auth_pb2.LogoutRequest(client=client(), refresh_token=session.refresh_token)
        )
        assert await verify(channel, session.access_token) == "SESSION_REVOKED"
