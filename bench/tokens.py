"""Token benchmarks (issue 5), measured in one run on one machine.

Usage: python bench/tokens.py [--seconds S] [--concurrency C]

1. VerifyAccessToken throughput divided by the throughput of an empty unary
   RPC (grpc.health.v1.Health/Check, which passes the same interceptors) on the
   same server: an `iam-grpc serve` subprocess in embedded mode, loaded from
   this process with C calls in flight.
2. Local guard verification (iam_grpc_client.TokenGuard) in µs per token.
3. Refresh rotations per second on MariaDB + Redis: a second server
   subprocess (`server.workers` = 1, then 2 pre-forked workers); sessions are
   created here through the service's own code, then C clients over 4
   connections each keep refreshing their session chain (a distinct client IP
   per call, as from many users). Three runs each; the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from _service import serve, throughput  # type: ignore[import-not-found]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from iam_grpc.proto import common_pb2, token_pb2, token_pb2_grpc
from iam_grpc_client import IamClient, TokenGuard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.sessions_helper
MYSQL = os.environ.get("TEST_MYSQL_SERVER", "mysql+asyncmy://root@127.0.0.1:3306")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"  # as sessions_helper


async def in_process_app(folder: Path, extra: dict[str, str]) -> Any:
    """The service's own code in this process (no serving needed) to create sessions."""
    from iam_grpc.app import Application
    from iam_grpc.testing import service_settings

    app = Application(service_settings(folder, {"IAM_HTTP_LISTEN": "", **extra}))
    await app.start()
    return app


async def sessions_for(app: Any, ips: list[str]) -> list[Any]:
    """One signed-in session per address (one user each: sessions.max_per_user would evict)."""
    from tests.sessions_helper import new_session, new_user

    sessions = []
    for ip in ips:
        _, session = await new_session(app, await new_user(app), ip=ip)
        sessions.append(session)
    return sessions


def random_ip() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


# The benchmark's clients rotate far faster than real ones (a real client rotates about once per
# access-token lifetime): the rotation-burst check and the per-ip refresh limit would rightly stop them.
BURSTS_ALLOWED = {
    "IAM_ANOMALY__BURST_MAX": "1000",
    "IAM_ANOMALY__BURST_WINDOW": "1s",
    "IAM_RATELIMIT__GROUPS": json.dumps({"refresh.ip": {"windows": ["100000/1s"]}}),
}


@contextlib.asynccontextmanager
async def mariadb_and_redis() -> AsyncIterator[dict[str, str]]:
    """A database of its own on MariaDB and a Redis prefix of its own, dropped afterwards."""
    name = "iam_bench_" + secrets.token_hex(3)
    admin = create_async_engine(MYSQL + "/", isolation_level="AUTOCOMMIT", hide_parameters=True)
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    try:
        yield {
            "IAM_DATABASE_URL": f"{MYSQL}/{name}",
            "IAM_REDIS_URL": REDIS,
            "IAM_REDIS__KEY_PREFIX": f"{name}:",
            "IAM_SECRETS__MASTER_KEY": secrets.token_urlsafe(32),
            "IAM_PASSWORDS__PEPPERS": json.dumps({"1": secrets.token_urlsafe(24)}),
            "IAM_PASSWORDS__CURRENT_PEPPER": "1",
            **BURSTS_ALLOWED,
        }
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


async def refresh_rate(seconds: float, concurrency: int, workers: int, *, checks: bool) -> float:
    """Rotations per second: C clients (a fixed address and device each, as real users) over 4
    connections, each refreshing its own chain."""
    from tests.sessions_helper import NO_ANOMALY_CHECKS

    async with mariadb_and_redis() as shared:
        if not checks:
            shared = {**shared, **NO_ANOMALY_CHECKS}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            ips = [random_ip() for _ in range(concurrency)]
            app = await in_process_app(folder / "helper", shared)
            try:
                sessions = await sessions_for(app, ips)
            finally:
                await app.stop()
            process, port = serve(folder, {**shared, "IAM_SERVER__WORKERS": str(workers)})
            # Several connections, as from several clients: SO_REUSEPORT spreads connections.
            channels = [
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
                for _ in range(4)
            ]
            try:
                rotations = 0
                warmed = 0
                go = asyncio.Event()
                started = stop = 0.0
                stubs = [token_pb2_grpc.TokenServiceStub(channel) for channel in channels]

                async def worker(stub: token_pb2_grpc.TokenServiceStub, session: Any, ip: str) -> None:
                    nonlocal rotations, warmed, started, stop
                    token = session.refresh_token
                    context = common_pb2.ClientContext(ip=ip, user_agent=UA, device_id=session.device_id)

                    async def rotate() -> None:
                        nonlocal token
                        answer = await stub.Refresh(
                            token_pb2.RefreshRequest(client=context, refresh_token=token)
                        )
                        if answer.WhichOneof("result") != "session":
                            raise RuntimeError(f"challenged: {answer.mfa.reason}")
                        token = answer.session.refresh_token

                    for _ in range(3):  # warm-up, not timed: connections, pools, the UA parser
                        await rotate()
                    warmed += 1
                    if warmed == len(sessions):
                        started = time.monotonic()
                        stop = started + seconds
                        go.set()
                    await go.wait()
                    while time.monotonic() < stop:
                        await rotate()
                        rotations += 1

                await asyncio.gather(
                    *(worker(stubs[i % len(stubs)], s, ips[i]) for i, s in enumerate(sessions))
                )
                elapsed = time.monotonic() - started
            finally:
                for channel in channels:
                    await channel.close()
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    return round(rotations / elapsed, 1)


async def verify_ratio(seconds: float, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        process, port = serve(folder, {})
        try:
            app = await in_process_app(folder, {})  # same data directory: same database and secrets
            try:
                (session,) = await sessions_for(app, [random_ip()])
                fresh = [  # distinct tokens, for the guard's first sight of a token
                    app.components.access.mint(
                        user_id=session.user_id,
                        session_id=session.session_id,
                        device_id=session.device_id,
                        roles=["user"],
                        auth_time=session.access_expires_at,
                    ).token
                    for _ in range(2000)
                ]
            finally:
                await app.stop()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                tokens = token_pb2_grpc.TokenServiceStub(channel)
                verify_request = token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
                await tokens.VerifyAccessToken(verify_request)  # the token is good
                # Alternating rounds, so that drift in the machine's load hits both alike.
                empties, verifies = [], []
                for _ in range(3):
                    empties.append(
                        await throughput(
                            lambda: health.Check(health_pb2.HealthCheckRequest()), seconds / 3, concurrency
                        )
                    )
                    verifies.append(
                        await throughput(
                            lambda: tokens.VerifyAccessToken(verify_request), seconds / 3, concurrency
                        )
                    )
            async with IamClient(f"127.0.0.1:{port}") as client:
                guard = TokenGuard(client)
                await guard.verify(session.access_token)
                rounds = 5000
                started = time.perf_counter()
                for _ in range(rounds):
                    await guard.verify(session.access_token)
                guard_us = (time.perf_counter() - started) / rounds * 1e6
                started = time.perf_counter()
                for token in fresh:
                    await guard.verify(token)
                guard_first_us = (time.perf_counter() - started) / len(fresh) * 1e6
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    baseline, verify = sum(empties) / 3, sum(verifies) / 3
    return {
        "empty_unary_per_s": round(baseline),
        "verify_access_token_per_s": round(verify),
        "verify_over_empty": round(verify / baseline, 3),
        "guard_verify_us_seen_before": round(guard_us, 1),
        "guard_verify_us_first_sight": round(guard_first_us, 1),
    }


async def anomaly_cost(rounds: int) -> dict[str, float]:
    """The anomaly evaluation's own cost per Refresh, in process on MariaDB + Redis: the same
    refreshes (one at a time) with the checks plugged in and taken out, timed, and the SQL
    statements each one ran."""
    from iam_grpc.core.client import ClientInfo
    from iam_grpc.wiring.accounts import build_refresh

    async with mariadb_and_redis() as shared:
        with tempfile.TemporaryDirectory() as tmp:
            app = await in_process_app(Path(tmp), shared)
            try:
                c = app.components
                checked = c.refresh
                # the same Refresh without the anomaly checks plugged in
                unchecked = build_refresh(
                    c.settings, c.stores, c.runtime, c.tokens, c.sessions, c.agents, c.risk, None
                )
                ips = [random_ip() for _ in range(rounds)]
                results: dict[str, tuple[float, float]] = {}
                for label, refresher in (
                    ("off", unchecked),
                    ("on", checked),
                    ("off2", unchecked),
                    ("on2", checked),
                ):
                    sessions = await sessions_for(app, ips[: rounds // 4])
                    statements = app.metrics.sql_statements._value.get()
                    started = time.perf_counter()
                    for session, ip in zip(sessions, ips, strict=False):
                        client = ClientInfo(ip=ip, user_agent=UA, device_id=session.device_id)
                        answer = await refresher.refresh(client, session.refresh_token)
                        if not hasattr(answer, "refresh_token"):
                            raise RuntimeError("challenged")
                    took = time.perf_counter() - started
                    count = len(sessions)
                    results[label] = (
                        took / count * 1e6,
                        (app.metrics.sql_statements._value.get() - statements) / count,
                    )
            finally:
                await app.stop()
    off = (results["off"][0] + results["off2"][0]) / 2
    on = (results["on"][0] + results["on2"][0]) / 2
    return {
        "refresh_us_without_checks": round(off),
        "refresh_us_with_checks": round(on),
        "anomaly_evaluation_us": round(on - off),
        "sql_statements_per_refresh_without_checks": round(results["off"][1], 1),
        "sql_statements_per_refresh_with_checks": round(results["on"][1], 1),
    }


async def main() -> None:
    from loguru import logger

    logger.remove()
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    results = await verify_ratio(args.seconds, args.concurrency)
    results.update(await anomaly_cost(400))
    for workers, checks in ((1, False), (2, False), (1, True), (2, True)):
        # Loopback runs on two shared cores vary by +-15 %: report the median and the spread.
        rates = sorted(
            [await refresh_rate(args.seconds * 2, args.concurrency, workers, checks=checks) for _ in range(3)]
        )
        name = f"refresh_per_s_mariadb_{workers}_worker{'s' if workers > 1 else ''}_checks_{'on' if checks else 'off'}"
        results[name] = rates[1]
        results[f"{name}_min_max"] = [rates[0], rates[-1]]
    results["refresh_clients"] = args.concurrency
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
