"""Migrations on both engines: from empty to head, down and up again, and no drift from the table definitions."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from iam_grpc.storage.sql import migrate
from iam_grpc.storage.sql.database import create_engine
from iam_grpc.storage.sql.tables import metadata


@pytest_asyncio.fixture(params=["sqlite", "mysql"], loop_scope="session")
async def empty_engine(
    request: pytest.FixtureRequest, tmp_path: Path, mysql_url: str
) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
        yield engine
        await engine.dispose()
        return
    server = mysql_url.rsplit("/", 1)[0]
    name = "iam_test_mig_" + secrets.token_hex(3)
    admin = create_async_engine(server + "/", isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name}"))
    engine = create_engine(f"{server}/{name}")
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda c: inspect(c).get_table_names())) - {"alembic_version"}


async def test_upgrade_from_empty_creates_the_whole_schema(empty_engine: AsyncEngine) -> None:
    """An empty database upgrades to head with every table of behaviour.md 10."""
    assert await migrate.current(empty_engine) is None
    await migrate.upgrade(empty_engine)
    assert await migrate.current(empty_engine) == migrate.head()
    assert await table_names(empty_engine) == set(metadata.tables)


async def test_downgrade_then_upgrade_round_trips(empty_engine: AsyncEngine) -> None:
    """Down to nothing and back up gives the same schema."""
    await migrate.upgrade(empty_engine)
    await migrate.downgrade(empty_engine, "base")
    assert await migrate.current(empty_engine) is None
    assert await table_names(empty_engine) == set()
    await migrate.upgrade(empty_engine)
    assert await table_names(empty_engine) == set(metadata.tables)


async def test_autogenerate_finds_no_difference_from_the_table_definitions(empty_engine: AsyncEngine) -> None:
    """The migrations and tables.py describe the same schema (types, nullability, indexes, constraints)."""
    await migrate.upgrade(empty_engine)
    async with empty_engine.connect() as connection:
        diff = await connection.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), metadata)
        )
    assert diff == []


async def test_upgrading_twice_changes_nothing(empty_engine: AsyncEngine) -> None:
    """Upgrade is idempotent (what every replica runs at startup in embedded mode)."""
    await migrate.upgrade(empty_engine)
    await migrate.upgrade(empty_engine)
    assert await migrate.current(empty_engine) == migrate.head()


def test_history_has_one_head() -> None:
    """The revision graph is linear, newest first."""
    history = migrate.history()
    assert history[0][0] == migrate.head()
    assert history[-1][1] is None


def test_the_startup_head_constant_matches_the_history() -> None:
    """schema.HEAD (read at startup without Alembic) is the migration head."""
    from iam_grpc.storage.sql import schema

    assert migrate.head() == schema.HEAD


async def test_database_revision_reads_what_alembic_wrote(empty_engine: AsyncEngine) -> None:
    """The cheap revision query agrees with Alembic, including for an empty database."""
    from iam_grpc.storage.sql import schema

    assert await schema.database_revision(empty_engine) is None
    await migrate.upgrade(empty_engine)
    assert await schema.database_revision(empty_engine) == await migrate.current(empty_engine) == schema.HEAD
