"""Shared fixtures: the real MariaDB/MySQL and Redis servers the suite runs against.

Each test session gets its own MySQL database (``iam_test_<random>``) and its
own Redis key prefix, removed at the end. A backend that does not answer is a
failure, never a skip: start them with ``scripts/services.sh``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from iam_grpc.storage.ports import DENY_TAG
from iam_grpc.storage.redis_topology import connect
from tests.redis_topologies import LocalCluster, LocalSentinel

MYSQL_SERVER = os.environ.get("TEST_MYSQL_SERVER", "mysql+asyncmy://root@127.0.0.1:3306")
REDIS_SERVER = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)
TEST_MASTER_KEY = secrets.token_urlsafe(32)
TEST_PEPPER = secrets.token_urlsafe(24)


def _awaited_frames(task: asyncio.Task[object]) -> Iterator[str]:
    """Where a task waits, outermost first (``Task.get_stack`` gives only the outermost frame):
    through coroutines, async generators (found behind their ``asend``/``athrow`` awaitables) and
    the futures and tasks they await."""
    link: object = task.get_coro()
    for _ in range(100):
        if link is None:
            return
        frame = (
            getattr(link, "cr_frame", None)
            or getattr(link, "ag_frame", None)
            or getattr(link, "gi_frame", None)
        )
        if frame is not None:
            yield f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
        if isinstance(link, asyncio.Task):
            yield f"awaits task {link.get_name()}"
            link = link.get_coro()
            continue
        if isinstance(link, asyncio.Future):
            yield f"awaits {link!r}"[:300]
            return
        following = getattr(link, "cr_await", None) or getattr(link, "ag_await", None)
        following = following or getattr(link, "gi_yieldfrom", None)
        if following is None and frame is None:  # an async generator's asend/athrow awaitable
            following = next(
                (r for r in gc.get_referents(link) if isinstance(r, types.AsyncGeneratorType)), None
            )
        link = following


_TASK_DUMPS: list[str] = []
_DUMP_BEFORE_TIMEOUT = 20.0  # seconds before pytest-timeout ends a hung test


def _dump_tasks(_signum: int, _frame: FrameType | None) -> None:
    """Where every asyncio task of a hung test waits (py-spy shows only an idle event loop).

    Sent by the timer of :func:`_hang_report` shortly before pytest-timeout fires, and by hand
    with ``kill -USR1 <worker pid>``; the dump becomes a section of the test's report."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    lines = []
    try:  # a signal handler must not raise into the test it interrupts
        for task in asyncio.all_tasks(loop):
            lines.append(f"task {task.get_name()}")
            lines.extend(f"    {where}" for where in _awaited_frames(task))
    except Exception as exc:
        lines.append(f"(the dump failed: {exc!r})")
    _TASK_DUMPS.append("\n".join(lines))


signal.signal(signal.SIGUSR1, _dump_tasks)

_LEFTOVER_GRACE = 15.0  # seconds a loop's leftover tasks get to end when the loop closes


def _bounded_cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio's closing of a test loop (pytest-asyncio's session runner) cancels the tasks tests
    left behind and waits for them, without a bound: one that swallows its cancellation (or
    awaits a clean-up that never ends) held a worker's last teardown past --timeout once. Here
    the wait is bounded, and what is left is named on stderr instead of hanging the run."""
    left = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.wait(left, timeout=_LEFTOVER_GRACE))
    stuck = [task for task in left if not task.done()]
    if stuck and sys.__stderr__ is not None:
        lines = [f"tasks still running when the test loop closed: {len(stuck)}"]
        for task in stuck:
            lines.append(f"task {task.get_name()}")
            lines.extend(f"    {where}" for where in _awaited_frames(task))
        sys.__stderr__.write("\n".join(lines) + "\n")


asyncio.runners._cancel_all_tasks = _bounded_cancel_all_tasks  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _hang_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Arms the task dump for a test that runs into ``--timeout`` (set up first, torn down last,
    so a hang in another fixture's teardown is covered too)."""
    limit = float(request.config.getoption("timeout", None) or 0)
    if limit <= _DUMP_BEFORE_TIMEOUT:
        yield
        return
    timer = threading.Timer(limit - _DUMP_BEFORE_TIMEOUT, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if _TASK_DUMPS:
        report.sections.append(("asyncio tasks of the hung test", "\n\n".join(_TASK_DUMPS)))  # type: ignore[attr-defined]
        _TASK_DUMPS.clear()
    return report


@dataclass(frozen=True)
class Backend:
    """Which adapters a test runs against, as the environment a deployment would set."""

    name: str
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return self.name == "mysql+redis"

    def isolated(self) -> dict[str, str]:
        """The environment with a Redis prefix of its own, so one service's limits and marks never
        meet another test's (replicas that must share state use one result for both)."""
        if not self.shared:
            return dict(self.environ)
        return {
            **self.environ,
            "IAM_REDIS__KEY_PREFIX": self.environ["IAM_REDIS__KEY_PREFIX"] + secrets.token_hex(3) + ":",
        }


async def _wait_for(probe, what: str, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await probe()
            return
        except Exception as exc:
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(
                    f"{what} is not reachable ({type(exc).__name__}); run scripts/services.sh", pytrace=False
                )
            await asyncio.sleep(0.5)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mysql_url() -> AsyncIterator[str]:
    """A fresh MySQL/MariaDB database for this test session."""
    name = f"iam_test_{RUN_ID}"
    admin = create_async_engine(MYSQL_SERVER + "/", isolation_level="AUTOCOMMIT")

    async def create() -> None:
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))

    await _wait_for(create, "MariaDB/MySQL at " + MYSQL_SERVER)
    try:
        yield f"{MYSQL_SERVER}/{name}"
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix for this test session; its keys are deleted at the end."""
    prefix = f"iam_test_{RUN_ID}:"
    # TEST_REDIS_URL may name a Sentinel or a Cluster too (the whole suite then runs on it)
    topology = connect(
        REDIS_SERVER,
        socket_timeout=timedelta(seconds=5),
        connect_timeout=timedelta(seconds=2),
        health_check_interval=timedelta(seconds=10),
        home_tag=DENY_TAG,
    )
    client = topology.client
    await _wait_for(topology.ping, "Redis at " + REDIS_SERVER)
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await topology.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_SERVER


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A three-node Redis Cluster of this test session (started on first use, about 3 s)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinel]:
    """A Redis master, its replica and three sentinels of this test session (started on first use,
    about 2 s). Tests that fail it over call ``settle()`` afterwards."""
    sentinel = LocalSentinel(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        sentinel.start()
        yield sentinel
    finally:
        sentinel.stop()


# Every Redis deployment the Redis adapters are checked on, by the URL form that selects it.
REDIS_TOPOLOGIES = ["redis", "redis-cluster", "redis-sentinel"]


def topology_url(request: pytest.FixtureRequest, topology: str) -> str:
    """``redis.url`` for one of :data:`REDIS_TOPOLOGIES` (starting its servers on first use)."""
    if topology == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    if topology == "redis-sentinel":
        return str(request.getfixturevalue("redis_sentinel").url)
    return REDIS_SERVER


def _shared_backend(mysql: str, prefix: str) -> Backend:
    return Backend(
        "mysql+redis",
        {
            "IAM_DATABASE_URL": mysql,
            "IAM_REDIS_URL": REDIS_SERVER,
            "IAM_REDIS__KEY_PREFIX": prefix,
            # one master key for every instance on the shared database, as in production
            "IAM_SECRETS__MASTER_KEY": TEST_MASTER_KEY,
            "IAM_PASSWORDS__PEPPERS": '{"1": "' + TEST_PEPPER + '"}',
            "IAM_PASSWORDS__CURRENT_PEPPER": "1",
            # Every worker answers token checks from its deny-list copy, as by default, but a
            # revoking call waits 200 ms for the copies instead of the default 1 s (hundreds of
            # tests revoke; tests/integration/test_denylist_copies.py runs the default bound).
            "IAM_TOKENS__DENYLIST_STALENESS": "200ms",
        },
    )


@pytest.fixture(scope="session", params=["sqlite+memory", "mysql+redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every server test runs on both modes' adapters."""
    if request.param == "sqlite+memory":
        return Backend("sqlite+memory")
    return _shared_backend(request.getfixturevalue("mysql_url"), request.getfixturevalue("redis_prefix"))


@pytest.fixture(scope="session")
def shared_backend(mysql_url: str, redis_prefix: str) -> Backend:
    """MySQL + Redis only: for behaviour that exists only with several replicas."""
    return _shared_backend(mysql_url, redis_prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis server of this test's own, so it can be stopped and started again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed", pytrace=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port, tmp_path
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False)


def start_redis(port: int, folder: Path) -> None:
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(folder),
        ],
        check=True,
        capture_output=True,
    )


@asynccontextmanager
async def _database_of_its_own(backend: Backend, mysql_url: str) -> AsyncIterator[Backend]:
    if not backend.shared:
        yield backend
        return
    server = mysql_url.rsplit("/", 1)[0]
    name = "iam_test_own_" + secrets.token_hex(4)
    admin = create_async_engine(server + "/", isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    try:
        yield Backend(backend.name, {**backend.isolated(), "IAM_DATABASE_URL": f"{server}/{name}"})
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def own_database(backend: Backend, mysql_url: str) -> AsyncIterator[Backend]:
    """The backend with a database of its own on MySQL (for tests that change shared rows, like keys)."""
    async with _database_of_its_own(backend, mysql_url) as isolated:
        yield isolated


@pytest_asyncio.fixture(loop_scope="session")
async def shared_own_database(shared_backend: Backend, mysql_url: str) -> AsyncIterator[Backend]:
    """MySQL + Redis with a database of its own."""
    async with _database_of_its_own(shared_backend, mysql_url) as isolated:
        yield isolated


# Tests that measure time (equal-work answers, latency under a storm, deadlines) or start
# Redis clusters and sentinels of their own: `make test` runs them alone, after the
# parallel part, so that another worker's load cannot decide their outcome.
SERIAL_FILES = (
    "tests/integration/test_degraded_paths.py",
    "tests/integration/test_login_security.py",
    "tests/integration/test_account_security.py",
    "tests/integration/test_password_reset.py",
    "tests/integration/test_redis_topologies.py",
    "tests/integration/test_interceptors.py",
    "tests/unit/test_passwords.py",
    "tests/unit/test_client_distribution.py",
)
SERIAL_PARAMS = ("redis-cluster", "redis-sentinel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path in SERIAL_FILES or any(param in item.nodeid for param in SERIAL_PARAMS):
            item.add_marker(pytest.mark.serial)
