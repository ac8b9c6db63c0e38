"""Login and Refresh throughput (issue 14): flows that need state, driven by Python gRPC clients.

Usage: python bench/flows.py [--seconds S] [--only emb1,prod1,prod2] [--accounts N] [--json FILE]

h2load sends one body again and again, which a login (a new session each time, sessions.max_per_user
evicts) or a refresh chain (each answer carries the next token) cannot use; these loads come from a
grpc.aio client in this process, whose own CPU is reported.

Servers as in bench/unary.py (embedded one worker; production mode on MariaDB + Redis with one
and two workers; the bench caller's API key; per-ip limits and the rotation-burst check lifted,
every other check on, anomaly checks included). On each server:

1. N accounts signed up through the API (8 at a time) for the logins, 32 more for the refreshes.
2. Login: 16 clients over 8 connections log in with the right password from the account's own
   device, a new client IP per call, for S seconds. Every answer must be a session.
   Reported against the argon2 limit (cores ÷ one argon2id verification at the default
   parameters, timed in this process before and after the load), and as the ratio the same CPU
   per login would give on a machine of its own: the CPU of the server's threads besides the
   event loop (the argon2 pool; grpc's poller thread is small) per login ÷ (server + loader CPU
   per login); MariaDB's and Redis's CPU are reported apart (they also serve other tests here).
3. Refresh: 32 clients over 8 connections, each rotating the chain of its own account (its own
   address and device), 3 untimed rotations each first; every answer must be a session.

For both: calls per second, the server's CPU per call, the loader's CPU, SQL statements per call
(``iam_sql_statements_total`` ÷ ``iam_login_total{outcome="session"}`` or
``iam_refresh_total{outcome="rotated"}``, every worker), and the fallback counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from _h2load import (  # type: ignore[import-not-found]
    by_label,
    delta,
    load_average,
    machine_busy,
    main_thread_cpu,
    process_cpu,
    scrape,
    store_pids,
    summed,
)
from login import argon2_limit  # type: ignore[import-not-found]
from unary import (  # type: ignore[import-not-found]
    API_KEY,
    API_KEY_HEADER,
    PASSWORD,
    UA,
    Account,
    Server,
    own_database,
    production_env,
    random_ip,
    signup,
    start_iam,
)

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc

METADATA = ((API_KEY_HEADER, API_KEY),)
CHANNELS = 8


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def accounts_on(server: Server, count: int) -> list[Account]:
    """``count`` accounts through Signup, 8 at a time (threads: signup() is a blocking client)."""
    gate = asyncio.Semaphore(8)

    async def one() -> Account:
        async with gate:
            return await asyncio.to_thread(signup, server.port)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def channels(server: Server) -> list[grpc.aio.Channel]:
    """Separate connections (SO_REUSEPORT spreads connections, not calls, over workers)."""
    return [
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]


class Load:
    """What one timed load did: calls, wall time, and the CPU of the server, the loader and the
    machine over it, with the server's counters before and after."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Load:
        self.before = summed(scrape(p) for p in self.server.metrics_ports)
        self.pids = self.server.pids
        self.server_cpu = sum(process_cpu(p) for p in self.pids)
        self.main_cpu = sum(main_thread_cpu(p) for p in self.pids)
        self.stores = store_pids()
        self.store_cpu = sum(process_cpu(p) for p in self.stores)
        self.loader_cpu = self_cpu()
        self.machine = machine_busy()
        self.load_before = load_average()
        self.started = time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.monotonic() - self.started
        self.server_cpu = sum(process_cpu(p) for p in self.pids) - self.server_cpu
        self.main_cpu = sum(main_thread_cpu(p) for p in self.pids) - self.main_cpu
        self.store_cpu = sum(process_cpu(p) for p in self.stores) - self.store_cpu
        self.loader_cpu = self_cpu() - self.loader_cpu
        self.machine = machine_busy() - self.machine
        self.after = summed(scrape(p) for p in self.server.metrics_ports)
        self.load_after = load_average()

    def row(self, calls: int, seconds: float, per: float) -> dict[str, Any]:
        """``per``: the number of operations to divide the SQL statements by."""
        return {
            "per_s": round(calls / seconds, 1),
            "calls": calls,
            "server_cores": round(self.server_cpu / self.wall, 3),
            "server_ms_per_call": round(self.server_cpu / max(calls, 1) * 1000, 2),
            # the event loop's thread, and the other threads (the argon2 pool, grpc's poller)
            "server_loop_ms_per_call": round(self.main_cpu / max(calls, 1) * 1000, 2),
            "server_threads_ms_per_call": round((self.server_cpu - self.main_cpu) / max(calls, 1) * 1000, 2),
            "loader_cores": round(self.loader_cpu / self.wall, 3),
            "loader_ms_per_call": round(self.loader_cpu / max(calls, 1) * 1000, 2),
            "stores_cores": round(self.store_cpu / self.wall, 3),
            "others_cores": round(
                max(0.0, self.machine - self.server_cpu - self.loader_cpu - self.store_cpu) / self.wall, 3
            ),
            "load_avg": [self.load_before, self.load_after],
            "sql_statements_per_call": round(
                delta(self.before, self.after, "iam_sql_statements_total") / max(per, 1), 2
            ),
            "codes": {
                k: v
                for method in ("/iam.v1.AuthService/Login", "/iam.v1.TokenService/Refresh")
                for k, v in by_label(self.before, self.after, "iam_rpc_total", "code", method=method).items()
            },
            "denylist_fallbacks": delta(self.before, self.after, "iam_denylist_fallbacks_total"),
            "ratelimit_fallbacks": delta(self.before, self.after, "iam_ratelimit_store_fallbacks_total"),
            "store_probe_failures": by_label(self.before, self.after, "iam_store_failures_total", "store"),
        }


async def login_load(
    server: Server, accounts: list[Account], seconds: float, concurrency: int
) -> dict[str, Any]:
    opened = channels(server)
    stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in opened]
    done = 0

    async def login(stub: auth_pb2_grpc.AuthServiceStub) -> None:
        account = accounts[secrets.randbelow(len(accounts))]
        answer = await stub.Login(
            auth_pb2.LoginRequest(
                client=common_pb2.ClientContext(ip=random_ip(), user_agent=UA, device_id=account.device_id),
                email=account.email,
                password=PASSWORD,
            ),
            metadata=METADATA,
        )
        if answer.WhichOneof("result") != "session":
            raise RuntimeError(f"login challenged: {answer.mfa.reason}")

    try:
        for i in range(CHANNELS):  # connections up, every worker touched once
            await login(stubs[i])
        with Load(server) as load:
            stop = time.monotonic() + seconds

            async def client(index: int) -> None:
                nonlocal done
                while time.monotonic() < stop:
                    await login(stubs[index % len(stubs)])
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(client(i) for i in range(concurrency)))
            elapsed = time.monotonic() - started
    finally:
        for channel in opened:
            await channel.close()
    sessions = delta(load.before, load.after, "iam_login_total", outcome="session")
    return load.row(done, elapsed, sessions)


async def refresh_load(
    server: Server, accounts: list[Account], seconds: float, concurrency: int
) -> dict[str, Any]:
    opened = channels(server)
    stubs = [token_pb2_grpc.TokenServiceStub(channel) for channel in opened]
    done = 0
    ready = 0
    go = asyncio.Event()
    stop = 0.0
    started = 0.0
    load: Load | None = None

    async def client(index: int, account: Account) -> None:
        nonlocal done, ready, stop, started, load
        stub = stubs[index % len(stubs)]
        token = account.refresh_token
        context = common_pb2.ClientContext(ip=account.ip, user_agent=UA, device_id=account.device_id)

        async def rotate() -> None:
            nonlocal token
            answer = await stub.Refresh(
                token_pb2.RefreshRequest(client=context, refresh_token=token), metadata=METADATA
            )
            if answer.WhichOneof("result") != "session":
                raise RuntimeError(f"refresh challenged: {answer.mfa.reason}")
            token = answer.session.refresh_token

        for _ in range(3):  # not timed: connections, pools, the UA parser
            await rotate()
        ready += 1
        if ready == concurrency:
            load = Load(server).__enter__()
            started = time.monotonic()
            stop = started + seconds
            go.set()
        await go.wait()
        while time.monotonic() < stop:
            await rotate()
            done += 1
        account.refresh_token = token

    try:
        await asyncio.gather(*(client(i, a) for i, a in enumerate(accounts[:concurrency])))
        elapsed = time.monotonic() - started
        assert load is not None
        load.__exit__()
    finally:
        for channel in opened:
            await channel.close()
    rotated = delta(load.before, load.after, "iam_refresh_total", outcome="rotated")
    return load.row(done, elapsed, rotated)


async def run_server(server: Server, seconds: float, accounts_count: int) -> dict[str, Any]:
    accounts = await accounts_on(server, accounts_count)
    single, limit = argon2_limit()
    login = await login_load(server, accounts, seconds, 16)
    single_after, limit_after = argon2_limit()
    argon2 = (limit + limit_after) / 2
    verify_ms = (single + single_after) / 2 * 1000
    login.update(
        argon2_verify_ms=round(verify_ms, 2),
        argon2_limit_per_s=round(argon2, 1),
        over_argon2_limit=round(login["per_s"] / argon2, 3),
        # What the ratio would be if the server and the loader had every core to themselves (the
        # machine is shared): the CPU of the server's threads other than the loop (the argon2 pool,
        # and grpc's poller, which is small) per login over all the CPU one login costs the server
        # and the loader.
        over_argon2_limit_cpu_bound=round(
            login["server_threads_ms_per_call"] / (login["server_ms_per_call"] + login["loader_ms_per_call"]),
            3,
        ),
    )
    # Accounts of their own: after the logins, the login accounts hold many live sessions, which
    # the anomaly checks rightly challenge (TOO_MANY_SESSIONS).
    fresh = await accounts_on(server, 32)
    refresh = await refresh_load(server, fresh, seconds, len(fresh))
    return {"login": login, "refresh": refresh}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=96)
    parser.add_argument("--only", default="", help="servers: emb1,prod1,prod2 (default all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    wanted = [
        n
        for n in ("emb1", "prod1", "prod2")
        if n in (set(filter(None, args.only.split(","))) or {"emb1", "prod1", "prod2"})
    ]
    from loguru import logger

    logger.remove()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            with contextlib.ExitStack() as stack:
                extra: dict[str, str] = {}
                if name != "emb1":
                    url, prefix = stack.enter_context(own_database())
                    extra = production_env(url, prefix)
                server = start_iam(Path(tmp) / name, name, extra, 2 if name == "prod2" else 1)
                stack.callback(server.stop)
                results[name] = asyncio.run(run_server(server, args.seconds, args.accounts))
                print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
