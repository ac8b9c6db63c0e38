"""The service on a Redis Cluster (``redis+cluster://``) and behind Sentinel (``redis+sentinel://``):
real servers on loopback ports (tests/redis_topologies.py), real services on MySQL.

What is checked: every flow runs on both without a single store failure (a command that crossed
Cluster slots would fail); the deny-list and its marker live on one Cluster node and the store's
server identity is that node's; a restart of that node, a Sentinel failover during a refresh chain,
and a failover to a replica that lost writes never let a revoked token through.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
import trustme

from iam_grpc.app import Application
from iam_grpc.core.tokens.denylist import sid_key
from iam_grpc.core.tokens.revocation_cache import GENERATION_KEY
from iam_grpc.errors import BackendUnavailable
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.storage import redis_topology
from iam_grpc.storage.ports import DENY_TAG
from iam_grpc.storage.redis import RedisEphemeral
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import NO_BURSTS, PASSWORD, client, new_email, signup
from tests.conftest import Backend
from tests.integration.test_tokens_shared import verify
from tests.redis_topologies import LocalCluster, LocalSentinel, TlsRedis, cli
from tests.sessions_helper import FIREFOX, NO_ANOMALY_CHECKS, new_session, until_trusted

LONG = timedelta(seconds=60)


def run_id(port: int) -> str:
    info = cli(port, "info", "server")
    return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("run_id:"))


def sample(app: Application, name: str, labels: dict[str, str] | None = None) -> float:
    return app.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def store_failures(app: Application) -> float:
    """Every way a failed Redis command shows: limiter and check fallbacks, deny-list SQL reads."""
    checks = ("pending_challenge", "pending_login", "risk_score")
    return (
        sample(app, "iam_ratelimit_store_fallbacks_total")
        + sample(app, "iam_denylist_fallbacks_total")
        + sum(sample(app, "iam_check_fallbacks_total", {"check": check}) for check in checks)
    )


def topology_env(backend: Backend, url: str, **extra: str) -> dict[str, str]:
    return {
        **backend.isolated(),
        "IAM_REDIS_URL": url,
        # a refresh chain of some hundred rotations a minute from one address
        "IAM_RATELIMIT__GROUPS": json.dumps({**NO_BURSTS, "refresh.ip": {"windows": ["1000/1s"]}}),
        "IAM_TOKENS__DENYLIST_REPLAY": "1h",  # only the generation marker may repair the cache
        **extra,
    }


@asynccontextmanager
async def two_replicas(environ: dict[str, str], folder: Path) -> AsyncIterator[tuple[RunningService, ...]]:
    async with running_service(folder / "a", environ) as a, running_service(folder / "b", environ) as b:
        yield a, b


async def keys_on(port: int, pattern: str) -> list[bytes]:
    """Keys of one server (a Cluster node answers for its own slots only)."""
    node = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        return [key async for key in node.scan_iter(match=pattern, count=1000)]
    finally:
        await node.aclose()


def refresh_request(token: str, device_id: str) -> token_pb2.RefreshRequest:
    return token_pb2.RefreshRequest(client=client(device_id=device_id), refresh_token=token)


# every flow on each topology ----------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["redis-cluster", "redis-sentinel"])
async def test_signup_login_refresh_verify_logout(
    request: pytest.FixtureRequest, shared_backend: Backend, tmp_path: Path, topology: str
) -> None:
    """Signup, Login, two Refreshes (with the anomaly checks, which read risk scores with one
    MGET), VerifyAccessToken and Logout through a real server on the topology, and not one store
    failure behind the answers. On the Cluster the deny-list and its marker are on the node of
    the {deny} slot, while the other keys spread over the nodes."""
    deployment: LocalCluster | LocalSentinel = request.getfixturevalue(topology.replace("-", "_"))
    env = topology_env(shared_backend, deployment.url)
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, tokens = auth_pb2_grpc.AuthServiceStub(channel), token_pb2_grpc.TokenServiceStub(channel)
        email = new_email()
        first = await signup(auth, email)
        login = await auth.Login(
            auth_pb2.LoginRequest(client=client(device_id=first.device_id), email=email, password=PASSWORD)
        )
        assert login.WhichOneof("result") == "session"
        session = login.session
        for _ in range(2):
            rotated = await tokens.Refresh(refresh_request(session.refresh_token, session.device_id))
            assert rotated.WhichOneof("result") == "session"
            session = rotated.session
            assert await verify(channel, session.access_token) == "OK"
        await auth.Logout(auth_pb2.LogoutRequest(client=client(), refresh_token=first.refresh_token))
        assert await verify(channel, first.access_token) == "SESSION_REVOKED"
        assert await verify(channel, session.access_token) == "OK"
        assert iam.app.components.denylist is not None
        assert iam.app.components.denylist.cache.trusted
        assert store_failures(iam.app) == 0
        prefix = env["IAM_REDIS__KEY_PREFIX"]
        if isinstance(deployment, LocalCluster):
            home = deployment.port_of(DENY_TAG)
            deny_keys = set(await keys_on(home, prefix + DENY_TAG + "*"))
            assert (prefix + sid_key(first.session_id)).encode() in deny_keys
            assert (prefix + GENERATION_KEY).encode() in deny_keys
            holding = [port for port in deployment.nodes if await keys_on(port, prefix + "*")]
            assert len(holding) >= 2, "the service's keys should spread over the nodes"
            for port in deployment.nodes:
                if port != home:
                    assert await keys_on(port, prefix + DENY_TAG + "*") == []


# Cluster -------------------------------------------------------------------------------------------


async def test_the_cluster_server_identity_is_the_node_holding_the_deny_list(
    redis_cluster: LocalCluster, redis_prefix: str
) -> None:
    """server_id is the run_id of the primary serving the {deny} slot, whatever node the last
    connection went to; another node restarting empty changes nothing, that node restarting
    empty is reported once, with its new run_id."""
    store = RedisEphemeral(redis_cluster.url, prefix=redis_prefix + "identity:")
    changes: list[str] = []
    store.server_listeners.append(changes.append)
    home = redis_cluster.port_of(DENY_TAG)
    other = next(port for port in redis_cluster.nodes if port != home)
    try:
        await store.set_many([(f"{{k{i}}}:v", b"1") for i in range(30)], LONG)  # every node
        await store.set(GENERATION_KEY, b"x", LONG)
        assert store.server_id == run_id(home)
        redis_cluster.restart_empty(other)
        assert await store.values([f"{{k{i}}}:v" for i in range(30)])  # reconnects to every node
        assert changes == []
        assert store.server_id == run_id(home)
        redis_cluster.restart_empty(home)
        assert await store.get(GENERATION_KEY) is None  # the node came back empty
        assert changes == [run_id(home)]
        assert store.server_id == run_id(home)
    finally:
        await store.close()


async def test_revocations_survive_a_restart_of_the_node_holding_the_deny_list(
    redis_cluster: LocalCluster, shared_backend: Backend, tmp_path: Path
) -> None:
    """Logout on replica A; the Cluster node of the {deny} slot restarts empty; from the first call
    on, the token answers SESSION_REVOKED on A and on B, a live token OK, and the deny-list is
    rebuilt on that node from SQL."""
    env = topology_env(shared_backend, redis_cluster.url, **NO_ANOMALY_CHECKS)
    async with two_replicas(env, tmp_path) as (a, b), a.channel() as on_a, b.channel() as on_b:
        _, ended = await new_session(a.app)
        _, alive = await new_session(a.app)
        await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
            auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token)
        )
        assert await verify(on_b, ended.access_token) == "SESSION_REVOKED"
        await asyncio.to_thread(redis_cluster.restart_empty, redis_cluster.port_of(DENY_TAG))
        seen: list[str] = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen += [await verify(on_a, ended.access_token), await verify(on_b, ended.access_token)]
            assert await verify(on_b, alive.access_token) == "OK"
        assert set(seen) == {"SESSION_REVOKED"}, seen
        # The rebuild waits for the node to answer again, with the recovery's backoff (up to 1 s
        # between tries): trusted again within a few seconds, SQL answering meanwhile (above).
        for replica in (a, b):
            assert replica.app.components.denylist is not None
            await until_trusted(replica.app.components.denylist.cache, seconds=5.0)
        assert a.app.components.ephemeral is not None
        assert await a.app.components.ephemeral.exists([sid_key(ended.session_id)]) == [True]


# Sentinel ------------------------------------------------------------------------------------------


async def test_after_a_failover_writes_go_to_the_new_master_or_fail(
    redis_sentinel: LocalSentinel, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After SENTINEL FAILOVER the old master keeps answering, and taking writes, until the
    sentinels reconfigure it seconds later. A store still connected to it has its batch writes
    refused (they would be lost); a store that asks the sentinels (every 0.5 s) moves to the new
    master, reports the new server once, and its writes land there."""
    old = redis_sentinel.master_port()
    monkeypatch.setattr(redis_topology, "MASTER_WATCH", 3600.0)
    stale = RedisEphemeral(redis_sentinel.url, prefix=redis_prefix + "stale:")
    await stale.set("warm", b"1", LONG)  # connected to the old master; its watch sleeps an hour
    monkeypatch.undo()
    moving = RedisEphemeral(redis_sentinel.url, prefix=redis_prefix + "moving:")
    changes: list[str] = []
    moving.server_listeners.append(changes.append)
    try:
        await moving.set("warm", b"1", LONG)
        assert moving.server_id == stale.server_id == run_id(old)
        new = await redis_sentinel.failover()
        with pytest.raises(BackendUnavailable):
            await stale.set_many([("{w}:stale", b"1")], LONG)
        deadline = time.monotonic() + 3
        while moving.server_id != run_id(new):
            assert time.monotonic() < deadline, "the store did not move to the new master"
            await moving.get("warm")
            await asyncio.sleep(0.05)
        assert changes == [run_id(new)]
        await moving.set_many([("{w}:moved", b"1")], LONG)
        master = aioredis.Redis(host="127.0.0.1", port=new)
        try:
            assert await master.get(redis_prefix + "moving:{w}:moved") == b"1"
            assert await master.get(redis_prefix + "stale:{w}:stale") is None
        finally:
            await master.aclose()
    finally:
        await stale.close()
        await moving.close()
        redis_sentinel.settle()


@pytest.mark.parametrize("how", ["sentinel-failover", "master-killed"])
async def test_a_refresh_chain_goes_on_through_a_sentinel_failover(
    redis_sentinel: LocalSentinel, shared_backend: Backend, tmp_path: Path, how: str
) -> None:
    """Two replicas; a session refreshed again and again, alternately on each, its new access
    token verified on the other, while the sentinels fail the master over: asked to
    (SENTINEL FAILOVER; the old master answers on until reconfigured) or because it was killed
    (Redis is gone for about 2 s). Not one call fails, no rotation is lost (the last refresh
    token still works), a session logged out before and one logged out during the failover
    never verify again on either replica, and both replicas trust the rebuilt deny-list on the
    new master afterwards."""
    env = topology_env(shared_backend, redis_sentinel.url, **NO_ANOMALY_CHECKS)
    errors: list[str] = []
    revoked_accepted: list[str] = []
    try:
        async with two_replicas(env, tmp_path) as (a, b), a.channel() as on_a, b.channel() as on_b:
            _, chain = await new_session(a.app)
            _, ended = await new_session(a.app)
            _, late = await new_session(a.app)
            await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token)
            )
            logged_out = [ended.access_token]
            stop = asyncio.Event()
            rotations = 0
            token, device = chain.refresh_token, chain.device_id

            async def refresh_chain() -> None:
                nonlocal token, rotations
                channels = (on_a, on_b)
                while not stop.is_set():
                    here, there = channels[rotations % 2], channels[(rotations + 1) % 2]
                    try:
                        answer = await token_pb2_grpc.TokenServiceStub(here).Refresh(
                            token_pb2.RefreshRequest(
                                client=client(ua=FIREFOX, device_id=device), refresh_token=token
                            ),
                            timeout=5,
                        )
                        assert answer.WhichOneof("result") == "session", answer
                        token = answer.session.refresh_token
                        rotations += 1
                        checked = await verify(there, answer.session.access_token)
                        if checked != "OK":
                            errors.append(f"verify {checked}")
                    except grpc.aio.AioRpcError as error:
                        errors.append(f"refresh {error.code().name}")
                    await asyncio.sleep(0.02)

            async def check_revoked() -> None:
                while not stop.is_set():
                    for access in list(logged_out):
                        for channel in (on_a, on_b):
                            if await verify(channel, access) == "OK":
                                revoked_accepted.append(access[-8:])
                    await asyncio.sleep(0.01)

            workers = [asyncio.ensure_future(refresh_chain()), asyncio.ensure_future(check_revoked())]
            try:
                await asyncio.sleep(0.5)
                before = rotations
                logout = auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                    auth_pb2.LogoutRequest(client=client(), refresh_token=late.refresh_token)
                )
                if how == "sentinel-failover":
                    await redis_sentinel.failover()
                    await logout  # the old master still answers, the sentinels name the new one
                    logged_out.append(late.access_token)
                else:
                    promoted = asyncio.ensure_future(redis_sentinel.kill_master())
                    await logout  # no master at all
                    logged_out.append(late.access_token)
                    await promoted
                await asyncio.sleep(1.5)
            finally:
                stop.set()
                await asyncio.gather(*workers)
            assert errors == []
            assert revoked_accepted == []
            assert rotations > before + 10, (before, rotations)
            last = await token_pb2_grpc.TokenServiceStub(on_b).Refresh(refresh_request(token, device))
            assert last.WhichOneof("result") == "session"
            assert await verify(on_a, last.session.access_token) == "OK"
            for replica in (a, b):
                assert replica.app.components.denylist is not None
                assert replica.app.components.denylist.cache.trusted
                assert replica.app.components.ephemeral is not None
                assert isinstance(replica.app.components.ephemeral, RedisEphemeral)
                assert replica.app.components.ephemeral.server_id == run_id(redis_sentinel.master_port())
    finally:
        redis_sentinel.settle()


async def test_a_failover_to_a_replica_that_lost_writes_rebuilds_the_deny_list(
    redis_sentinel: LocalSentinel, shared_backend: Backend, tmp_path: Path
) -> None:
    """The replica misses a deny-list entry the master holds (deleted on the replica alone, as a
    write the replication had not carried yet), while the generation marker it holds is intact.
    The sentinels promote it: both replicas see another server, stop trusting the cache and
    rebuild it from SQL, so the logged-out token never verifies, before, during or after."""
    env = topology_env(shared_backend, redis_sentinel.url, **NO_ANOMALY_CHECKS)
    old = redis_sentinel.master_port()
    replica = redis_sentinel.replica_port(old)
    try:
        async with two_replicas(env, tmp_path) as (a, b), a.channel() as on_a, b.channel() as on_b:
            _, ended = await new_session(a.app)
            await auth_pb2_grpc.AuthServiceStub(on_a).Logout(
                auth_pb2.LogoutRequest(client=client(), refresh_token=ended.refresh_token)
            )
            entry = env["IAM_REDIS__KEY_PREFIX"] + sid_key(ended.session_id)
            deadline = time.monotonic() + 5
            while cli(replica, "exists", entry).strip() != "1":  # replicated
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            cli(replica, "config", "set", "replica-read-only", "no")
            assert cli(replica, "del", entry).strip() == "1"
            assert cli(replica, "exists", env["IAM_REDIS__KEY_PREFIX"] + GENERATION_KEY).strip() == "1"
            seen: list[str] = []

            async def check() -> None:
                seen.extend([await verify(on_a, ended.access_token), await verify(on_b, ended.access_token)])

            await check()
            failover = asyncio.ensure_future(redis_sentinel.failover())
            while not failover.done():
                await check()
            await failover
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                await check()
            assert set(seen) == {"SESSION_REVOKED"}, seen
            assert cli(replica, "exists", entry).strip() == "1"  # rebuilt on the new master
            assert (
                sample(a.app, "iam_denylist_rebuilds_total") + sample(b.app, "iam_denylist_rebuilds_total")
                >= 1
            )
            for app in (a.app, b.app):
                assert app.components.denylist is not None
                assert app.components.denylist.cache.trusted
    finally:
        cli(replica, "config", "set", "replica-read-only", "yes")
        redis_sentinel.settle()


# TLS -----------------------------------------------------------------------------------------------


async def test_the_tls_forms_reach_a_cluster_and_a_sentinel_master(tmp_path: Path, redis_prefix: str) -> None:
    """rediss+cluster:// and rediss+sentinel:// with the CA in the query work end to end (reads,
    MGET, a script, ping, the server identity); the same servers without TLS cannot be reached."""
    servers = TlsRedis(tmp_path, trustme.CA())
    try:
        servers.start()
        tls = ("--tls", "--cacert", str(servers.ca_file))
        for url, port in (
            (f"rediss+cluster://127.0.0.1:{servers.cluster_port}", servers.cluster_port),
            (f"rediss+sentinel://127.0.0.1:{servers.sentinel_port}/iam/0", servers.master_port),
        ):
            store = RedisEphemeral(f"{url}?ssl_ca_certs={servers.ca_file}", prefix=redis_prefix + "tls:")
            try:
                await store.set("{t}:a", b"1", LONG)
                assert await store.incr("{t}:n", 2, LONG) == 2
                assert await store.get_many(["{t}:a", "{t}:n", "{t}:none"]) == [b"1", b"2", None]
                await store.ping()
                server = cli(port, "info", "server", tls=tls)
                assert f"run_id:{store.server_id}" in server
            finally:
                await store.close()
            plain = RedisEphemeral(
                url.replace("rediss+", "redis+"), connect_timeout=timedelta(milliseconds=300)
            )
            try:
                with pytest.raises(BackendUnavailable):
                    await plain.get("{t}:a")
            finally:
                await plain.close()
    finally:
        servers.stop()
