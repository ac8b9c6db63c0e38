"""The fault suite's own world: two replicas (`iam-grpc serve` processes) on a MariaDB database of
their own reached through a TCP proxy of the suite's own, a redis-server of the suite's own, and
an SMTP server (aiosmtpd) of the suite's own. Faults are injected only into these: the shared
MariaDB and Redis other work uses are never stopped, stalled or flushed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import MYSQL_SERVER, TEST_MASTER_KEY, TEST_PEPPER
from tests.mailbox import Mailbox
from tests.served import ServedProcess, free_port
from tests.tcp_proxy import TcpProxy


class RedisServer:
    """A redis-server process of the suite's own, on a fixed port: killed (SIGKILL), stalled
    (SIGSTOP/SIGCONT) and started again empty."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    pytest.fail("the suite's redis-server did not start")
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stall(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@dataclass
class Stack:
    replicas: list[ServedProcess]
    redis: RedisServer
    proxy: TcpProxy
    mailbox: Mailbox
    database: AsyncEngine  # direct, not through the proxy: for the suite's own consistency checks
    folder: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    folder = tmp_path_factory.mktemp("faults")
    name = "iam_test_faults_" + secrets.token_hex(3)
    admin = create_async_engine(MYSQL_SERVER + "/", isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    server = make_url(MYSQL_SERVER)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 3306)
    proxy.start()
    redis_server = RedisServer(folder / "redis")
    redis_server.start()
    mailbox = Mailbox()
    mailbox.start()
    through_proxy = server.set(host="127.0.0.1", port=proxy.port, database=name)
    environ = {
        "IAM_DATABASE_URL": through_proxy.render_as_string(hide_password=False),
        "IAM_REDIS_URL": redis_server.url,
        "IAM_REDIS__KEY_PREFIX": "iam_faults:",
        "IAM_SMTP_URL": mailbox.url,
        "IAM_SECRETS__MASTER_KEY": TEST_MASTER_KEY,
        "IAM_PASSWORDS__PEPPERS": json.dumps({"1": TEST_PEPPER}),
        "IAM_PASSWORDS__CURRENT_PEPPER": "1",
        "IAM_MAIL__POLL_INTERVAL": "200ms",
        "IAM_MAIL__RETRY_BACKOFF": '["500ms", "1s"]',
        "IAM_MAIL__MAX_ATTEMPTS": "50",
        # The load refreshes each session every second or two: far above a person's rate, so the
        # rotation-burst check would end them. Every other anomaly check stays on.
        "IAM_ANOMALY__BURST_MAX": "1000",
        "IAM_RESET__RESPONSE_FLOOR": "50ms",
        # Each account signs in and refreshes from one address many times a minute.
        "IAM_RATELIMIT__GROUPS": json.dumps(
            {"login.pair": {"windows": ["1000/1h fc"]}, "refresh.ip": {"windows": ["1000/1s"]}}
        ),
        "IAM_LOGGING__FILES": "false",
    }
    replicas = [ServedProcess(folder / name, environ) for name in ("a", "b")]
    database = create_async_engine(f"{MYSQL_SERVER}/{name}")
    try:
        for replica in replicas:  # one after the other: the first migrates
            replica.start()
        yield Stack(replicas, redis_server, proxy, mailbox, database, folder)
    finally:
        for replica in replicas:
            replica.stop()
        if redis_server.process is not None and redis_server.process.poll() is None:
            redis_server.resume()  # a stalled process must run again to die cleanly
        redis_server.kill()
        mailbox.stop()
        proxy.close()
        await database.dispose()
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


@pytest.fixture
def report_lines() -> Iterator[list[str]]:
    """Lines of the fault report, printed at the end of the test (run with -s to see them)."""
    lines: list[str] = []
    yield lines
    for line in lines:
        print(line)
