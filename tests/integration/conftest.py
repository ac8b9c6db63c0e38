"""Fixtures for integration tests: migrated SQL databases on both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from iam_grpc.storage.sql import migrate
from iam_grpc.storage.sql.database import SqlDatabase
from tests.mailbox import Mailbox


@pytest_asyncio.fixture(scope="session", loop_scope="session", params=["sqlite", "mysql"])
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mysql_url: str
) -> AsyncIterator[SqlDatabase]:
    """A migrated database per engine, shared by the session (tests use fresh ids)."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sql") / "contract.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        url = mysql_url
    db = SqlDatabase.from_url(url)
    await migrate.upgrade(db.engine)
    yield db
    await db.close()


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) for the module's service to send to."""
    box = Mailbox()
    box.start()
    yield box
    box.stop()
