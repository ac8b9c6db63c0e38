"""Unary gRPC throughput with h2load (issue 14): the transport's speed and iam-grpc's, side by side.

Usage: python bench/unary.py [--seconds S] [--connections C] [--streams M] [--rounds R]
                             [--only NAME,...] [--json FILE]

Four servers run at once (idle while another is loaded), each target is loaded in turn by h2load
for S seconds after a 2 s warm-up run, and the whole list is repeated R times, so that drift in
the machine's load hits every target alike; the median of the rounds is reported.

- ``bare``: a grpc.aio server with only the health service (bench/bare_health.py), one process;
- ``emb1``: ``iam-grpc serve`` in embedded mode (SQLite, in-process state), one worker;
- ``prod1`` / ``prod2``: production mode (``IAM_MODE=production``: MariaDB on 127.0.0.1:3306 in a
  database of its own, Redis with a key prefix of its own), one worker and two pre-forked workers.

On each iam-grpc server: ``grpc.health.v1.Health/Check``, ``iam.v1.TokenService/VerifyAccessToken``
with a valid access token (from a Signup), and Envoy's ``envoy.service.auth.v3.Authorization/Check``
with ``authorization: Bearer <token>``; the calls carry a configured caller's API key.

Counting gRPC successes: h2load reports HTTP status only, and gRPC errors are HTTP 200. Two
independent counts are used:
1. DATA bytes. An answer with grpc-status other than 0 is trailers-only (no DATA frame); every OK
   answer to the same request has the same body, measured once with a Python client. h2load's
   DATA byte count ÷ that length = answers with a body; it must equal h2load's "done".
2. The server's own /metrics (``iam_rpc_total`` by method and code, every worker), read before and
   after the timed run: the split by code (CANCELLED left out: calls still in flight when h2load
   closed its connections at the end, which it does not count either). This is the one that counts ext_authz denials, which
   are answered with grpc-status 0 and a ``CheckResponse`` status (the access log interceptor
   counts them under their real code).
The figure reported is h2load's rate × the OK share (the smaller of the two when both exist).

The same /metrics deltas count what the issue fears under saturation: deny-list fallbacks to SQL,
rate-limit store fallbacks, failed store probes and UNAVAILABLE answers; the server's log lines at
WARNING and above during the run are counted from its stdout, and every worker's ``iam_serving``
gauge is sampled twice a second (a NOT_SERVING while the stores are fine is a false outage).

CPU: h2load's own user+system time (os.wait4), the server processes' (/proc/PID/stat, workers
included) and the whole machine's (/proc/stat) over the same wall time; "others" is what neither
used (other helpers' tests on the shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _h2load import (  # type: ignore[import-not-found]
    LoadResult,
    by_label,
    delta,
    grpc_frame,
    h2load,
    h2load_path,
    load_average,
    scrape,
    summed,
    tree,
)
from _service import IAM, free_port  # type: ignore[import-not-found]
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc

HERE = Path(__file__).resolve().parent
MYSQL = os.environ.get("TEST_MYSQL_SERVER", "mysql+asyncmy://root@127.0.0.1:3306")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "correct horse battery staple 42"  # noqa: S105 - the benchmark accounts' password
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
API_KEY = "iamk_bench_" + secrets.token_urlsafe(32)[:43]
API_KEY_HEADER = "x-iam-api-key"
HEALTH = "/grpc.health.v1.Health/Check"
VERIFY = "/iam.v1.TokenService/VerifyAccessToken"
CHECK = "/envoy.service.auth.v3.Authorization/Check"
# Bench users sign up, log in and rotate at rates no person would: lift the per-ip and per-account
# limits and the rotation-burst check (bench/tokens.py does the same); every check still runs.
GROUPS = json.dumps(
    {
        "signup.ip": {"windows": ["100000/1s"]},
        "signup.pair": {"windows": ["100000/1s"]},
        "login.ip": {"windows": ["100000/1s"]},
        "login.pair": {"windows": ["100000/1s"]},
        "login.ip_fail": {"windows": ["100000/1h f"]},
        "login.account": {"windows": ["100000/1h fc"]},
        "refresh.ip": {"windows": ["100000/1s"]},
    }
)


def random_ip() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (worker k's ops listener is port + k - 1)."""
    for _ in range(100):
        first = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


# --- servers ---------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_ports: list[int] = field(default_factory=list)
    log: Path | None = None

    @property
    def pids(self) -> list[int]:
        return tree(self.process.pid)

    @property
    def workers(self) -> int:
        return max(1, len(self.metrics_ports))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_bare(variant: str = "plain") -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "bare_health.py"), str(port), variant],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise RuntimeError("the bare server did not start")
    return Server(variant, process, port)


def caller_env() -> dict[str, str]:
    """One calling service with the bench's API key, allowed every method, trusted for client.ip."""
    return {
        "IAM_CALLERS__BENCH__API_KEY_SHA256": json.dumps([hashlib.sha256(API_KEY.encode()).hexdigest()]),
        "IAM_CALLERS__BENCH__METHODS": '["*"]',
        "IAM_CALLERS__BENCH__TRUST_CLIENT_IP": "true",
        "IAM_EXT_AUTHZ__RULES": json.dumps([{"prefix": "/admin", "roles": ["admin"]}]),
        "IAM_RATELIMIT__GROUPS": GROUPS,
        "IAM_ANOMALY__BURST_MAX": "1000",
        "IAM_ANOMALY__BURST_WINDOW": "1s",
    }


def production_env(database_url: str, prefix: str) -> dict[str, str]:
    """``IAM_MODE=production`` on MariaDB and Redis; the parts a token check never touches (HIBP,
    MX lookups, SMTP delivery) are off or point nowhere."""
    return {
        "IAM_MODE": "production",
        "IAM_DATABASE_URL": database_url,
        "IAM_DATABASE__AUTO_MIGRATE": "true",
        "IAM_REDIS_URL": REDIS,
        "IAM_REDIS__KEY_PREFIX": prefix,
        "IAM_SECRETS__MASTER_KEY": secrets.token_urlsafe(32),
        "IAM_PASSWORDS__PEPPERS": json.dumps({"1": secrets.token_urlsafe(24)}),
        "IAM_PASSWORDS__CURRENT_PEPPER": "1",
        "IAM_SMTP_URL": f"smtp://127.0.0.1:{free_port()}",
        "IAM_PUBLIC_LINK_BASE": "https://app.example",
        "IAM_HIBP_MODE": "off",
        "IAM_MX_CHECK": "false",
    }


def start_iam(folder: Path, name: str, extra: dict[str, str], workers: int = 1) -> Server:
    """``iam-grpc serve`` with the shipped logging (INFO, JSON lines to stdout, here a file, and
    the log files under the data directory); returns once every worker reports SERVING."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    http = free_ports(workers)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_DATA_DIR=str(folder),
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN=f"127.0.0.1:{http}",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        IAM_SERVER__WORKERS=str(workers),
        **caller_env(),
        **json.loads(os.environ.get("BENCH_IAM_ENV", "{}")),  # extra settings, e.g. the deny-list copy
        **extra,
    )
    log = folder / "stdout.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([IAM, "serve"], cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(name, process, port, [http + k for k in range(workers)], log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        try:
            if all(scrape(p).get(("iam_serving", ()), 0) == 1 for p in server.metrics_ports):
                return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not start")


@contextlib.contextmanager
def own_database() -> Iterator[tuple[str, str]]:
    """A MariaDB database and a Redis key prefix of its own (as the test suite makes them), dropped
    and deleted afterwards."""
    from redis import Redis
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    name = "iam_bench_" + secrets.token_hex(3)

    async def admin(statement: str) -> None:
        engine = create_async_engine(MYSQL + "/", isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(admin(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    try:
        yield f"{MYSQL}/{name}", f"{name}:"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name}"))
        client = Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# --- requests ------------------------------------------------------------------------------------


@dataclass
class Account:
    email: str
    ip: str
    device_id: str
    access_token: str
    refresh_token: str
    session_id: str


def signup(port: int) -> Account:
    """A new account through the API; its first session's tokens."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        email = f"bench.{secrets.token_hex(4)}@example.com"
        ip = random_ip()
        answer = auth_pb2_grpc.AuthServiceStub(channel).Signup(
            auth_pb2.SignupRequest(
                client=common_pb2.ClientContext(ip=ip, user_agent=UA),
                email=email,
                password=PASSWORD,
                name="Bench",
                terms_accepted=True,
            ),
            metadata=((API_KEY_HEADER, API_KEY),),
            timeout=30,
        )
    session = answer.session
    return Account(
        email, ip, session.device_id, session.access_token, session.refresh_token, session.session_id
    )


def verify_request(token: str) -> token_pb2.VerifyAccessTokenRequest:
    return token_pb2.VerifyAccessTokenRequest(access_token=token)


def check_request(token: str) -> external_auth_pb2.CheckRequest:
    """What Envoy's ext_authz filter sends for ``GET /api/orders/42`` with a bearer token."""
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET",
        host="app.example",
        scheme="https",
        path="/api/orders/42?page=2",
        headers={
            ":authority": "app.example",
            ":method": "GET",
            ":path": "/api/orders/42?page=2",
            "authorization": f"Bearer {token}",
            "user-agent": UA,
            "accept": "application/json",
            "x-request-id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        },
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def answer_length(port: int, method: str, request: Message) -> int:
    """The length of an OK answer's DATA (the 5-byte prefix and the message), from one real call;
    the call must succeed (and a Check must allow)."""
    metadata = ((API_KEY_HEADER, API_KEY),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer: Any
        if method == HEALTH:
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        elif method == VERIFY:
            answer = token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                request, metadata=metadata, timeout=10
            )
        else:
            answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                request, metadata=metadata, timeout=10
            )
            if answer.status.code != 0:
                raise RuntimeError(f"the Check was refused: {answer}")
    return 5 + len(answer.SerializeToString())


# --- targets ---------------------------------------------------------------------------------------


@dataclass
class Target:
    key: str  # server.method, e.g. "prod2.verify"
    server: Server
    method: str
    request: Message
    headers: tuple[str, ...] = ()
    answer_bytes: int = 0


def targets_for(server: Server) -> list[Target]:
    out = [Target(f"{server.name}.health", server, HEALTH, health_pb2.HealthCheckRequest())]
    if server.metrics_ports:  # an iam-grpc server
        token = signup(server.port).access_token
        key = (f"{API_KEY_HEADER}: {API_KEY}",)
        out.append(Target(f"{server.name}.verify", server, VERIFY, verify_request(token), key))
        out.append(Target(f"{server.name}.authz", server, CHECK, check_request(token), key))
    for target in out:
        target.answer_bytes = answer_length(server.port, target.method, target.request)
    return out


def log_lines(path: Path | None, offset: int) -> tuple[int, dict[str, int]]:
    """The log's new end, and its new lines at WARNING and above by message."""
    if path is None:
        return 0, {}
    with path.open("rb") as source:
        source.seek(offset)
        text = source.read()
    found: dict[str, int] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        level = str(record.get("level", ""))
        if level in ("WARNING", "ERROR", "CRITICAL"):
            message = f"{level}: {record.get('msg', '')}"
            if "store" in record:
                message += f" (store={record['store']})"
            found[message] = found.get(message, 0) + 1
    return offset + len(text), found


def measure(target: Target, seconds: float, connections: int, streams: int) -> dict[str, Any]:
    server = target.server
    url = f"http://127.0.0.1:{server.port}{target.method}"
    body = grpc_frame(target.request)
    shape = {"headers": target.headers, "connections": connections, "streams": streams}
    h2load(url, body, seconds=2.0, **shape)  # warm-up, not counted: connections, caches, pools
    before = {p: scrape(p) for p in server.metrics_ports}
    offset = server.log.stat().st_size if server.log else 0
    # Every worker's iam_serving gauge, twice a second during the run: a NOT_SERVING under load
    # while the stores are healthy is a false outage.
    serving: list[float] = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            for port in server.metrics_ports:
                with contextlib.suppress(OSError):
                    serving.append(scrape(port).get(("iam_serving", ()), 1.0))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result: LoadResult = h2load(url, body, seconds=seconds, server_pids=server.pids, **shape)
    finally:
        running.clear()
        watcher.join()
    after = {p: scrape(p) for p in server.metrics_ports}
    _, warnings = log_lines(server.log, offset)
    with_body = result.data_bytes / target.answer_bytes
    ok_by_body = with_body / result.done if result.done else 0.0
    row: dict[str, Any] = {
        "target": target.key,
        "rps_http": round(result.requests_per_s),
        "done": result.done,
        "answers_with_body": round(with_body, 2),
        "ok_share_by_body": round(ok_by_body, 4),
        "loader_cores": round(result.loader_cpu / result.wall, 3),
        "loader_us_per_call": round(result.loader_cpu / max(result.done, 1) * 1e6, 1),
        "server_cores": round(result.server_cpu / result.wall, 3),
        "server_us_per_call": round(result.server_cpu / max(result.done, 1) * 1e6, 1),
        "stores_cores": round(result.store_cpu / result.wall, 3),
        "others_cores": round(result.others_cores, 3),
        "load_avg": [result.load_before, result.load_after],
    }
    ok_share = ok_by_body
    if server.metrics_ports:
        summed_before = summed(before.values())
        summed_after = summed(after.values())
        codes = by_label(summed_before, summed_after, "iam_rpc_total", "code", method=target.method)
        # CANCELLED: calls in flight when h2load closed its connections at the end (not answered,
        # not counted by h2load either)
        handled = sum(v for k, v in codes.items() if k != "CANCELLED")
        ok_by_metrics = codes.get("OK", 0.0) / handled if handled else 0.0
        ok_share = min(ok_by_body, ok_by_metrics) if target.method != CHECK else ok_by_metrics
        row.update(
            codes=codes,
            ok_share_by_metrics=round(ok_by_metrics, 4),
            calls_per_worker=[
                round(delta(before[p], after[p], "iam_rpc_total", method=target.method))
                for p in server.metrics_ports
            ],
            denylist_fallbacks=delta(summed_before, summed_after, "iam_denylist_fallbacks_total"),
            ratelimit_fallbacks=delta(summed_before, summed_after, "iam_ratelimit_store_fallbacks_total"),
            store_probe_failures=by_label(summed_before, summed_after, "iam_store_failures_total", "store"),
            unavailable=sum(
                v
                for k, v in by_label(summed_before, summed_after, "iam_rpc_total", "code").items()
                if k == "UNAVAILABLE"
            ),
            not_serving_samples=f"{sum(1 for v in serving if v != 1.0)}/{len(serving)}",
            sql_statements=delta(summed_before, summed_after, "iam_sql_statements_total"),
            key_reloads=delta(summed_before, summed_after, "iam_key_reloads_total"),
            warnings=warnings,
        )
    row["rps_grpc_ok"] = round(result.requests_per_s * ok_share)
    return row


RATIOS = (
    ("emb1.health / bare.health", "emb1.health", "bare.health", "≥ 0.70 (interceptor chain ≤ 30 %)"),
    ("prod1.health / bare.health", "prod1.health", "bare.health", "≥ 0.70"),
    ("prod2.health / prod1.health", "prod2.health", "prod1.health", ""),
    ("prod2.health / 2 / bare.health", "prod2.health", "bare.health", "per worker, ≥ 0.70"),
    ("emb1.verify / emb1.health", "emb1.verify", "emb1.health", ""),
    ("prod1.verify / prod1.health", "prod1.verify", "prod1.health", ""),
    ("prod2.verify / prod2.health", "prod2.verify", "prod2.health", "≥ 0.85"),
    ("prod2.authz / prod2.health", "prod2.authz", "prod2.health", "≥ 0.85"),
    ("prod2.verify / prod1.verify", "prod2.verify", "prod1.verify", "≥ 1.5"),
    ("prod2.verify (absolute, /s)", "prod2.verify", "", "≥ 5,100 /s"),
)


def ratios(rates: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for label, top, bottom, goal in RATIOS:
        if top not in rates or (bottom and bottom not in rates):
            continue
        value = rates[top] / rates[bottom] if bottom else rates[top]
        if label.startswith("prod2.health / 2"):
            value /= 2
        out.append({"ratio": label, "value": round(value, 3), "goal": goal})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="", help="servers to run: bare,emb1,prod1,prod2 (default all)")
    parser.add_argument("--json", type=Path, help="also write every run's row here")
    parser.add_argument("--methods", default="health,verify,authz", help="which of health,verify,authz")
    args = parser.parse_args()
    h2load_path()
    wanted = set(filter(None, args.only.split(","))) or {"bare", "emb1", "prod1", "prod2"}
    from loguru import logger

    logger.remove()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        servers: list[Server] = []
        try:
            if "bare" in wanted:
                bare = start_bare()
                bare.name = "bare"
                servers.append(bare)
            if "emb1" in wanted:
                servers.append(start_iam(folder / "emb1", "emb1", {}))
            for name, workers in (("prod1", 1), ("prod2", 2)):
                if name in wanted:
                    url, prefix = stack.enter_context(own_database())
                    servers.append(start_iam(folder / name, name, production_env(url, prefix), workers))
            methods = set(args.methods.split(","))
            targets = [t for s in servers for t in targets_for(s) if t.key.split(".", 1)[1] in methods]
            for round_ in range(args.rounds):
                for target in targets:
                    row = measure(target, args.seconds, args.connections, args.streams)
                    row["round"] = round_ + 1
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for server in servers:
                server.stop()
    rates = {
        key: statistics.median(r["rps_grpc_ok"] for r in rows if r["target"] == key)
        for key in dict.fromkeys(r["target"] for r in rows)
    }
    summary = {
        "rps_grpc_ok_median": rates,
        "ratios": ratios(rates),
        "h2load": f"-c {args.connections} -m {args.streams} -t 1 -D {args.seconds} (after a 2 s warm-up run)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_avg_end": load_average(),
    }
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, **summary}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
