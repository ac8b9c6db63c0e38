"""Login and Refresh latency as the user base grows: 1,000 users, then 100,000, then 1,000 again.

Usage: python bench/scale.py [--calls N] [--large N] [--json FILE]

One server in production mode (MariaDB + Redis, one worker, every check on, the bench caller's
API key; per-ip limits and the rotation-burst check lifted as in bench/flows.py). 32 probe accounts are signed up through the
API; the rest of the user base is written by bulk insert (``INSERT ... SELECT`` over MariaDB's
sequence tables), not through argon2: each seeded user has the probe's password hash, the default
role, a device, a live session and an active refresh token, so every table a Login or a Refresh
reads grows with it.

At each size: ``--calls`` Logins and as many Refreshes, one call at a time (latency, not
throughput), spread over the probe accounts (each logs in from its own device, refreshes its own
chain). The sizes run small, large, small again (the seeded rows deleted), so a drift of the
machine shows as a difference between the two small runs. Reported: p50, p95 and p99 per size,
and large ÷ small for each (the goal: at most 1.5).
"""

# ruff: noqa: S608 - the statements are built from integers and constants of this file, never input

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from unary import (  # type: ignore[import-not-found]
    API_KEY,
    API_KEY_HEADER,
    PASSWORD,
    UA,
    Account,
    own_database,
    production_env,
    random_ip,
    signup,
    start_iam,
)

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc

METADATA = ((API_KEY_HEADER, API_KEY),)
PROBES = 32
SEED_PREFIX = "01"  # seeded ids: "01" and 24 digits (valid ULID characters), apart from real ones


async def seed(engine: AsyncEngine, first: int, last: int) -> None:
    """Users ``first``..``last`` (sequence numbers), each with the template's password hash, the
    default role, a device, a live session and an active refresh token, in chunks of 20,000."""
    async with engine.begin() as connection:
        template = (
            await connection.execute(
                text("SELECT password_hash, pepper_id FROM users ORDER BY created_at LIMIT 1")
            )
        ).one()
        role_id = (await connection.execute(text("SELECT id FROM roles WHERE name = 'user'"))).scalar_one()
    chunk = 20_000
    for start in range(first, last + 1, chunk):
        end = min(last, start + chunk - 1)
        seq = f"seq_{start}_to_{end}"
        uid = f"CONCAT('{SEED_PREFIX}', LPAD(seq, 24, '0'))"
        did = f"CONCAT('{SEED_PREFIX}', LPAD(seq + 200000000, 24, '0'))"
        sid = f"CONCAT('{SEED_PREFIX}', LPAD(seq + 400000000, 24, '0'))"
        now = "UTC_TIMESTAMP(6)"
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    f"INSERT INTO users (id, email, email_norm, password_hash, pepper_id, name,"
                    f" terms_accepted_at, created_at, updated_at)"
                    f" SELECT {uid}, CONCAT('seeded.', seq, '@example.com'),"
                    f" CONCAT('seeded.', seq, '@example.com'), :hash, :pepper, 'Seeded', {now}, {now}, {now}"
                    f" FROM {seq}"
                ),
                {"hash": template.password_hash, "pepper": template.pepper_id},
            )
            await connection.execute(
                text(
                    f"INSERT INTO user_roles (user_id, role_id, granted_at, granted_by)"
                    f" SELECT {uid}, :role, {now}, 'bench' FROM {seq}"
                ),
                {"role": role_id},
            )
            await connection.execute(
                text(
                    f"INSERT INTO devices (id, created_at, last_seen_at, user_agent) SELECT {did}, {now}, {now},"
                    f" :ua FROM {seq}"
                ),
                {"ua": UA},
            )
            await connection.execute(
                text(
                    f"INSERT INTO user_devices (user_id, device_id, first_seen_at, last_seen_at, baseline,"
                    f" known_networks, known_countries, last_ip)"
                    f" SELECT {uid}, {did}, {now}, {now}, '{{}}', '[]', '[]', '10.0.0.1' FROM {seq}"
                )
            )
            await connection.execute(
                text(
                    f"INSERT INTO sessions (id, user_id, device_id, created_at, auth_at, last_refreshed_at,"
                    f" absolute_expires_at, created_ip, last_ip)"
                    f" SELECT {sid}, {uid}, {did}, {now}, {now}, {now}, {now} + INTERVAL 30 DAY,"
                    f" '10.0.0.1', '10.0.0.1' FROM {seq}"
                )
            )
            await connection.execute(
                text(
                    f"INSERT INTO refresh_tokens (session_id, token_hash, key_version, generation, state,"
                    f" created_at, expires_at, access_jti)"
                    f" SELECT {sid}, LPAD(seq, 43, 's'), 1, 0, 'active', {now}, {now} + INTERVAL 7 DAY,"
                    f" LPAD(seq, 22, 'j') FROM {seq}"
                )
            )


async def unseed(engine: AsyncEngine) -> None:
    """Every seeded row goes (the foreign keys cascade from users and devices)."""
    async with engine.begin() as connection:
        await connection.execute(
            text(f"DELETE FROM users WHERE id LIKE '{SEED_PREFIX}0%' AND name = 'Seeded'")
        )
        await connection.execute(
            text(f"DELETE FROM devices WHERE id LIKE '{SEED_PREFIX}0%' AND user_agent = :ua"), {"ua": UA}
        )


async def count_users(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT COUNT(*) FROM users"))).scalar_one())


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p95_ms": round(cuts[94] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
    }


async def measure(port: int, accounts: list[Account], calls: int) -> dict[str, Any]:
    """``calls`` Logins then ``calls`` Refreshes, one at a time, round robin over the accounts."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        logins: list[float] = []
        for n in range(calls):
            account = accounts[n % len(accounts)]
            request = auth_pb2.LoginRequest(
                client=common_pb2.ClientContext(ip=random_ip(), user_agent=UA, device_id=account.device_id),
                email=account.email,
                password=PASSWORD,
            )
            started = time.perf_counter()
            answer = await auth.Login(request, metadata=METADATA, timeout=30)
            logins.append(time.perf_counter() - started)
            if answer.WhichOneof("result") != "session":
                raise RuntimeError(f"login challenged: {answer.mfa.reason}")
            # the previous session ends (untimed): an account keeps one live session, as the
            # anomaly checks' max_sessions expects of a real user
            await auth.Logout(
                auth_pb2.LogoutRequest(client=request.client, refresh_token=account.refresh_token),
                metadata=METADATA,
                timeout=30,
            )
            account.refresh_token = answer.session.refresh_token
            account.ip = request.client.ip
        refreshes: list[float] = []
        for n in range(calls):
            account = accounts[n % len(accounts)]
            request = token_pb2.RefreshRequest(
                client=common_pb2.ClientContext(ip=account.ip, user_agent=UA, device_id=account.device_id),
                refresh_token=account.refresh_token,
            )
            started = time.perf_counter()
            answer = await tokens.Refresh(request, metadata=METADATA, timeout=30)
            refreshes.append(time.perf_counter() - started)
            if answer.WhichOneof("result") != "session":
                raise RuntimeError(f"refresh challenged: {answer.mfa.reason}")
            account.refresh_token = answer.session.refresh_token
    return {"login": _percentiles(logins), "refresh": _percentiles(refreshes)}


async def run(
    port: int, url: str, accounts: list[Account], calls: int, small: int, large: int
) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        real = await count_users(engine)
        results: dict[str, Any] = {}
        await seed(engine, 1, small - real)
        await measure(port, accounts, len(accounts))  # warm: connections, pools, caches
        results["small"] = {"users": await count_users(engine), **await measure(port, accounts, calls)}
        started = time.monotonic()
        await seed(engine, small - real + 1, large - real)
        seeded_s = time.monotonic() - started
        results["large"] = {
            "users": await count_users(engine),
            "seed_s": round(seeded_s, 1),
            **await measure(port, accounts, calls),
        }
        await unseed(engine)
        await seed(engine, 1, small - real)
        results["small_again"] = {"users": await count_users(engine), **await measure(port, accounts, calls)}
    finally:
        await engine.dispose()
    base = {
        flow: {
            k: (results["small"][flow][k] + results["small_again"][flow][k]) / 2
            for k in ("p50_ms", "p95_ms", "p99_ms")
        }
        for flow in ("login", "refresh")
    }
    results["large_over_small"] = {
        flow: {k: round(results["large"][flow][k] / base[flow][k], 3) for k in base[flow]} for flow in base
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url, prefix = stack.enter_context(own_database())
        server = start_iam(Path(tmp) / "scale", "prod1", production_env(url, prefix), 1)
        stack.callback(server.stop)
        accounts = [signup(server.port) for _ in range(PROBES)]
        results = asyncio.run(run(server.port, url, accounts, args.calls, args.small, args.large))
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), file=sys.stdout)


if __name__ == "__main__":
    main()
