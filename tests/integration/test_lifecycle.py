"""Startup, health and shutdown of the application (behaviour.md 11.4-11.6)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from iam_grpc.app import Application, StartupError
from iam_grpc.storage.sql.tables import signing_keys
from iam_grpc.testing import running_service, service_settings
from tests.conftest import Backend, start_redis


async def health_of(address: str) -> int:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(answer.status)


async def test_a_different_master_key_cannot_start_on_existing_keys(tmp_path: Path) -> None:
    """Signing keys are useless without their master key: startup stops and names secrets.master_key (S27)."""
    first = {"IAM_SECRETS__MASTER_KEY": secrets.token_urlsafe(32)}
    async with running_service(tmp_path, first):
        pass
    other = Application(service_settings(tmp_path, {"IAM_SECRETS__MASTER_KEY": secrets.token_urlsafe(32)}))
    with pytest.raises(
        StartupError, match=r"^secrets\.master_key: signing key \S+: no configured master key can decrypt it$"
    ):
        await other.start()
    assert other.server is None


async def test_a_corrupt_key_row_stops_startup_naming_the_table(tmp_path: Path) -> None:
    """A live key whose stored public JWK is damaged is a clear startup error, not a traceback."""
    async with running_service(tmp_path) as running:
        async with running.app.components.db.transaction() as tx:
            (row,) = await tx.keys.all()
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'iam.db'}")
    async with engine.begin() as connection:
        await connection.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == row.kid)
            .values(public_jwk={**row.public_jwk, "x": "a"})
        )
    await engine.dispose()
    other = Application(service_settings(tmp_path))
    with pytest.raises(
        StartupError, match=r"^signing_keys table: signing key \S+: its public key \(public_jwk\) is corrupt$"
    ):
        await other.start()


async def test_a_rotated_master_key_still_starts_with_the_old_one_listed(tmp_path: Path) -> None:
    """Listing the old key under secrets.previous_master_keys keeps the stored keys readable."""
    old = secrets.token_urlsafe(32)
    async with running_service(tmp_path, {"IAM_SECRETS__MASTER_KEY": old}):
        pass
    env = {
        "IAM_SECRETS__MASTER_KEY": secrets.token_urlsafe(32),
        "IAM_SECRETS__PREVIOUS_MASTER_KEYS": f'["{old}"]',
    }
    async with running_service(tmp_path, env) as running:
        assert await health_of(running.address) == health_pb2.HealthCheckResponse.SERVING


async def test_embedded_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    """The first embedded start writes secrets.toml with mode 0600; later starts reuse it."""
    async with running_service(tmp_path):
        pass
    secrets_file = tmp_path / "secrets.toml"
    content = secrets_file.read_text()
    assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
    async with running_service(tmp_path):
        pass
    assert secrets_file.read_text() == content


async def test_a_busy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    """Startup names the listen setting when the port is taken, and leaves nothing running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = Application(service_settings(tmp_path, {"IAM_GRPC_LISTEN": f"127.0.0.1:{port}"}))
        with pytest.raises(StartupError, match="IAM_GRPC_LISTEN"):
            await app.start()


async def test_pending_migrations_stop_startup_without_auto_migrate(
    backend: Backend, tmp_path: Path, mysql_url: str
) -> None:
    """With auto_migrate off, an empty database refuses startup and says how to migrate."""
    if backend.shared:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        name = "iam_test_pending_" + secrets.token_hex(3)
        server_url = mysql_url.rsplit("/", 1)[0]
        admin = create_async_engine(server_url + "/", isolation_level="AUTOCOMMIT")
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {name}"))
        environ = {**backend.isolated(), "IAM_DATABASE_URL": f"{server_url}/{name}"}
    else:
        environ = {}
    try:
        app = Application(service_settings(tmp_path, {**environ, "IAM_DATABASE__AUTO_MIGRATE": "false"}))
        with pytest.raises(StartupError, match="run `iam-grpc migrate`"):
            await app.start()
        migrating = Application(
            service_settings(tmp_path, {**environ, "IAM_DATABASE__AUTO_MIGRATE": "false"}),
            migrate_on_start=True,
        )
        await migrating.start()
        await migrating.stop(drain_delay=timedelta(0))
    finally:
        if backend.shared:
            async with admin.connect() as connection:
                await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            await admin.dispose()


async def test_draining_reports_not_serving_before_the_server_stops(tmp_path: Path) -> None:
    """On stop, health turns NOT_SERVING first and stays reachable for the drain delay."""
    app = Application(service_settings(tmp_path))
    await app.start()
    address = f"127.0.0.1:{app.grpc_port}"
    assert await health_of(address) == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(app.stop(drain_delay=timedelta(seconds=2)))
    await asyncio.sleep(0.3)
    assert await health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping
    assert not app.readiness.serving


async def test_calls_in_flight_finish_during_shutdown(tmp_path: Path) -> None:
    """A call that is running when stop() begins completes with its real answer within the grace period."""
    import grpc

    from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2

    app = Application(service_settings(tmp_path, {"IAM_TEST_FAILPOINTS": "1"}))
    await app.start()
    app.failpoints.arm("rpc:/iam.v1.AuthService/Logout", "sleep:1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = auth_pb2_grpc.AuthServiceStub(channel).Logout(
            auth_pb2.LogoutRequest(
                client=common_pb2.ClientContext(ip="192.0.2.1"), refresh_token="iamr_" + "x" * 43
            )
        )
        await asyncio.sleep(0.3)  # the call is now inside the failpoint
        stopping = asyncio.create_task(app.stop(drain_delay=timedelta(0), grace=timedelta(seconds=5)))
        answer = await call  # the servicer answered: not cut off by the shutdown
        await stopping
    assert answer == auth_pb2.LogoutResponse()


async def test_new_calls_are_refused_once_draining_ends(tmp_path: Path) -> None:
    """After stop() the port no longer answers."""
    import grpc

    app = Application(service_settings(tmp_path))
    await app.start()
    address = f"127.0.0.1:{app.grpc_port}"
    await app.stop(drain_delay=timedelta(0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_of(address)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_embedded_files_are_private(tmp_path: Path) -> None:
    """The data directory, database and secrets are readable by the service's user only."""
    data = tmp_path / "data"
    async with running_service(data):
        pass
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "iam.db").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "secrets.toml").stat().st_mode & 0o777) == "0o600"


async def test_health_follows_the_stores(private_redis: tuple[int, Path], tmp_path: Path) -> None:
    """Redis lost: any number of failed probes leaves health SERVING (every RPC answers from its
    fallback), while the dependency report says ``down``; back, one probe makes it answer again.
    (The database's three-probe rule is S59 in test_half_written.py.)"""
    port, folder = private_redis
    start_redis(port, folder)
    await asyncio.sleep(0.3)
    env = {"IAM_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    async with running_service(tmp_path, env, probe_interval=3600) as running:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert running.app.readiness.dependencies.states()["redis"] == "up"
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)
        for _ in range(4):
            await running.app.readiness.probe_once()
            assert await health_of(running.address) == serving
            assert running.app.readiness.dependencies.states()["redis"] == "down"
        start_redis(port, folder)
        for _ in range(50):
            if await running.app.readiness.check_stores():
                break
            await asyncio.sleep(0.1)
        await running.app.readiness.probe_once()
        assert await health_of(running.address) == serving
        assert running.app.readiness.dependencies.states()["redis"] in ("up", "degraded")
