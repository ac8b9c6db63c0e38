"""The SQL statements and Redis round trips of one Login and one Refresh (issue 14).

Usage: python bench/statements.py [--mode production|embedded] [--calls N]

The service runs in this process (``Application``, production mode on MariaDB + Redis in a
database and key prefix of its own, or embedded mode on SQLite) and is called through its own
gRPC port, so the whole path runs: interceptors, rate limits, servicer, flows, storage. Every SQL
statement (SQLAlchemy ``before_cursor_execute`` on the service's engine) and every Redis round
trip (redis-py's ``send_packed_command``: a pipeline or a script is one) is recorded with the
phase it happened in: while the caller waited for its answer, or in the 300 ms after the answer
(work the service finished later, e.g. audit rows written by a background task). Statements of
the service's own periodic jobs in that window show up too (the outbox poll, the store probes);
they are marked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio.connection import AbstractConnection
from sqlalchemy import event
from unary import (  # type: ignore[import-not-found]
    API_KEY,
    API_KEY_HEADER,
    PASSWORD,
    UA,
    caller_env,
    own_database,
    production_env,
    random_ip,
)

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc

METADATA = ((API_KEY_HEADER, API_KEY),)
PERIODIC = ("outbox", "SELECT 1")  # the service's own jobs, not the call's
phase = "idle"
records: list[tuple[str, str, str]] = []  # (phase, kind, text)
_ARRAY = re.compile(rb"\*(\d+)\r\n")
_BULK = re.compile(rb"\$(\d+)\r\n")


def on_statement(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
    records.append((phase, "sql", " ".join(statement.split())[:160]))


def on_commit(_conn: Any) -> None:
    records.append((phase, "sql", "COMMIT"))


def commands(data: bytes) -> list[str]:
    """The commands in a RESP buffer (one, or a pipeline's several): name and first key."""
    out = []
    at = 0
    while (array := _ARRAY.match(data, at)) is not None:
        at = array.end()
        args = []
        for _ in range(int(array.group(1))):
            bulk = _BULK.match(data, at)
            if bulk is None:
                return out
            size = int(bulk.group(1))
            args.append(data[bulk.end() : bulk.end() + size])
            at = bulk.end() + size + 2
        name = args[0].decode().upper() if args else "?"
        # EVALSHA sha numkeys key...; others: NAME key ...
        key = (
            args[3] if name in ("EVALSHA", "EVAL") and len(args) > 3 else (args[1] if len(args) > 1 else b"")
        )
        out.append(f"{name} {key.decode(errors='replace').split(':', 1)[-1][:60]}")
    return out


_send = AbstractConnection.send_packed_command


async def send_packed_command(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
    data = b"".join(command) if isinstance(command, list | tuple) else bytes(command)
    records.append((phase, "redis", " + ".join(commands(data)) or "?"))
    await _send(self, command, check_health)


def report(label: str, marked: list[tuple[str, str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"call": label}
    for name in ("in call", "after answer"):
        rows = [(kind, text) for p, kind, text in marked if p == name]
        out[name] = {
            "sql_statements": sum(
                1 for kind, text in rows if kind == "sql" and text != "COMMIT" and not _periodic(text)
            ),
            "commits": sum(1 for kind, text in rows if text == "COMMIT"),
            "redis_round_trips": sum(1 for kind, _ in rows if kind == "redis"),
            "list": [
                f"{kind}: {text}" + ("  [periodic job]" if _periodic(text) else "") for kind, text in rows
            ],
        }
    return out


def _periodic(text: str) -> bool:
    return any(p in text for p in PERIODIC)


async def observe(label: str, call: Any) -> tuple[Any, dict[str, Any]]:
    global phase
    records.clear()
    phase = "in call"
    answer = await call
    phase = "after answer"
    await asyncio.sleep(0.3)
    phase = "idle"
    return answer, report(label, list(records))


async def run(env: dict[str, str], calls: int) -> list[dict[str, Any]]:
    from iam_grpc.app import Application
    from iam_grpc.testing import service_settings

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        app = Application(service_settings(Path(tmp), {**caller_env(), **env, "IAM_HTTP_LISTEN": ""}))
        await app.start()
        try:
            engines = [app.components.db.engine.sync_engine]
            if getattr(app.components.db, "_inline", None) is not None:  # SQLite runs on its own sync engine
                engines.append(app.components.db._inline)
            for engine in engines:
                event.listen(engine, "before_cursor_execute", on_statement)
                event.listen(engine, "commit", on_commit)
            results = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                auth = auth_pb2_grpc.AuthServiceStub(channel)
                tokens = token_pb2_grpc.TokenServiceStub(channel)
                ip = random_ip()
                email = f"bench.{secrets.token_hex(4)}@example.com"
                client = common_pb2.ClientContext(ip=ip, user_agent=UA)
                signed, report_ = await observe(
                    "Signup",
                    auth.Signup(
                        auth_pb2.SignupRequest(
                            client=client, email=email, password=PASSWORD, name="Bench", terms_accepted=True
                        ),
                        metadata=METADATA,
                    ),
                )
                results.append(report_)
                device = signed.session.device_id
                for i in range(calls):
                    answer, report_ = await observe(
                        f"Login {i + 1}",
                        auth.Login(
                            auth_pb2.LoginRequest(
                                client=common_pb2.ClientContext(
                                    ip=random_ip(), user_agent=UA, device_id=device
                                ),
                                email=email,
                                password=PASSWORD,
                            ),
                            metadata=METADATA,
                        ),
                    )
                    assert answer.WhichOneof("result") == "session", answer
                    results.append(report_)
                token = answer.session.refresh_token
                refresh_client = common_pb2.ClientContext(ip=ip, user_agent=UA, device_id=device)
                for i in range(calls):
                    answer, report_ = await observe(
                        f"Refresh {i + 1}",
                        tokens.Refresh(
                            token_pb2.RefreshRequest(client=refresh_client, refresh_token=token),
                            metadata=METADATA,
                        ),
                    )
                    assert answer.WhichOneof("result") == "session", answer
                    token = answer.session.refresh_token
                    results.append(report_)
                access = answer.session.access_token
                answer, report_ = await observe(
                    "VerifyAccessToken",
                    tokens.VerifyAccessToken(
                        token_pb2.VerifyAccessTokenRequest(access_token=access), metadata=METADATA
                    ),
                )
                results.append(report_)
        finally:
            await app.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("production", "embedded"), default="production")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="list every statement of every call")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if args.mode == "production":
            url, prefix = stack.enter_context(own_database())
            env = production_env(url, prefix)
        results = asyncio.run(run(env, args.calls))
    shown: Counter[str] = Counter()
    for result in results:
        kind = result["call"].split()[0]
        print(
            f"{result['call']}: in call {result['in call']['sql_statements']} SQL statements, "
            f"{result['in call']['commits']} commits, "
            f"{result['in call']['redis_round_trips']} Redis round trips; after the answer "
            f"{result['after answer']['sql_statements']} SQL, {result['after answer']['redis_round_trips']} Redis"
        )
        # the statements of the last call of each kind (the first ones warm caches)
        last = [r for r in results if r["call"].split()[0] == kind][-1]
        if (args.verbose or result is last) and not shown[kind]:
            shown[kind] += 1
            for name in ("in call", "after answer"):
                for line in result[name]["list"]:
                    print(f"    {name}: {line}")


if __name__ == "__main__":
    main()
