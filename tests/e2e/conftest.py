"""Fixtures for end-to-end tests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.conftest import MYSQL_SERVER


@pytest.fixture
def fresh_mysql() -> Iterator[str]:
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    name = "iam_test_cli_" + secrets.token_hex(3)

    async def execute(statement: str) -> None:
        engine = create_async_engine(MYSQL_SERVER + "/", isolation_level="AUTOCOMMIT")
        async with engine.connect() as connection:
            await connection.execute(text(statement))
        await engine.dispose()

    asyncio.run(execute(f"CREATE DATABASE {name}"))
    yield f"{MYSQL_SERVER}/{name}"
    asyncio.run(execute(f"DROP DATABASE IF EXISTS {name}"))
