"""Login benchmarks (issue 6), measured in one run on one machine.

Usage: python bench/login.py [--seconds S] [--concurrency C] [--rounds N]

1. The argon2 limit: cores ÷ the time of one argon2id verification with the
   default parameters (the median of 30 warm verifications in this process).
   No login service can exceed it: every login runs one verification.
2. Login throughput: an `iam-grpc serve` subprocess in embedded mode, 64
   accounts signed up through the API, then C clients over 4 connections log
   in with correct passwords from their trusted devices (a new client IP per
   call, as from many users) for S seconds. Reported as logins/s and as a
   fraction of the argon2 limit (goal ≥ 0.85).
3. Enumeration timing: N alternating rounds of a Login with an unknown email
   and a Login with a wrong password for an existing account, one at a time;
   the medians of the two must be within 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from _service import serve  # type: ignore[import-not-found]
from argon2 import PasswordHasher, Type

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2

PASSWORD = "correct horse battery staple 42"  # noqa: S105 - the benchmark accounts' password
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
# Per-ip and per-pair bursts are for attackers; a benchmark of many users must not trip them.
GROUPS = json.dumps(
    {
        "signup.ip": {"windows": ["100000/1s"]},
        "signup.pair": {"windows": ["100000/1s"]},
        "login.ip": {"windows": ["100000/1s"]},
        "login.pair": {"windows": ["100000/1s"]},
        "login.ip_fail": {"windows": ["100000/1h f"]},
        "login.account": {"windows": ["100000/1h fc"]},
    }
)


def argon2_limit() -> tuple[float, float]:
    """(seconds per verification, verifications per second over every core)."""
    hasher = PasswordHasher(
        time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
    )
    stored = hasher.hash(PASSWORD)
    for _ in range(3):
        hasher.verify(stored, PASSWORD)  # warm
    timings = []
    for _ in range(30):
        started = time.perf_counter()
        hasher.verify(stored, PASSWORD)
        timings.append(time.perf_counter() - started)
    single = statistics.median(timings)
    return single, (os.cpu_count() or 1) / single


def random_ip() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


async def create_accounts(stub: auth_pb2_grpc.AuthServiceStub, count: int) -> list[tuple[str, str]]:
    accounts = []
    for i in range(count):
        email = f"bench.{i}.{secrets.token_hex(3)}@example.com"
        answer = await stub.Signup(
            auth_pb2.SignupRequest(
                client=common_pb2.ClientContext(ip=random_ip(), user_agent=UA),
                email=email,
                password=PASSWORD,
                name="Bench",
                terms_accepted=True,
            )
        )
        accounts.append((email, answer.session.device_id))
    return accounts


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process (all its threads) has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def login_rate(
    port: int, accounts: list[tuple[str, str]], seconds: float, concurrency: int
) -> tuple[float, int]:
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
    done = 0
    stop = time.monotonic() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        stub = stubs[index % len(stubs)]
        while time.monotonic() < stop:
            email, device_id = accounts[secrets.randbelow(len(accounts))]
            answer = await stub.Login(
                auth_pb2.LoginRequest(
                    client=common_pb2.ClientContext(ip=random_ip(), user_agent=UA, device_id=device_id),
                    email=email,
                    password=PASSWORD,
                )
            )
            assert answer.WhichOneof("result") == "session"
            done += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    return done / (time.monotonic() - started), done


async def enumeration_timing(port: int, accounts: list[tuple[str, str]], rounds: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)

        async def timed(email: str, password: str) -> float:
            started = time.perf_counter()
            try:
                await stub.Login(
                    auth_pb2.LoginRequest(
                        client=common_pb2.ClientContext(ip=random_ip(), user_agent=UA),
                        email=email,
                        password=password,
                    )
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
            return time.perf_counter() - started

        unknown, wrong = [], []
        for i in range(rounds):
            email, _ = accounts[i % len(accounts)]
            unknown.append(await timed(f"nobody.{secrets.token_hex(4)}@example.com", PASSWORD))
            wrong.append(await timed(email, "not the password 1"))
    unknown_ms, wrong_ms = statistics.median(unknown) * 1000, statistics.median(wrong) * 1000
    return {
        "unknown_email_median_ms": round(unknown_ms, 2),
        "wrong_password_median_ms": round(wrong_ms, 2),
        "median_difference": round(abs(unknown_ms - wrong_ms) / max(unknown_ms, wrong_ms), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        process, port = serve(Path(tmp), {"IAM_RATELIMIT__GROUPS": GROUPS})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                accounts = await create_accounts(auth_pb2_grpc.AuthServiceStub(channel), 64)
            single, limit = argon2_limit()
            cpu_before = cpu_seconds(process.pid)
            rate, logins = await login_rate(port, accounts, args.seconds, args.concurrency)
            cpu_per_login = (cpu_seconds(process.pid) - cpu_before) / logins
            single_after, limit_after = argon2_limit()  # the machine may have drifted during the load
            verify = (single + single_after) / 2
            results.update(
                argon2_verify_ms=round(verify * 1000, 2),
                argon2_limit_per_s=round((limit + limit_after) / 2, 1),
                logins_per_s=round(rate, 1),
                logins_over_argon2_limit=round(rate / ((limit + limit_after) / 2), 3),
                # The server's CPU per login (every thread), and what is left after the argon2
                # verification: the part that a faster service could still cut.
                server_cpu_ms_per_login=round(cpu_per_login * 1000, 2),
                server_cpu_ms_per_login_besides_argon2=round((cpu_per_login - verify) * 1000, 2),
            )
            results.update(await enumeration_timing(port, accounts, args.rounds))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
