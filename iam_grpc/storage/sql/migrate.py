"""Schema migrations with Alembic, run on an async engine we already own.

Alembic's commands are synchronous; they run inside ``AsyncConnection.run_sync``
with the connection passed through ``Config.attributes`` (Alembic's cookbook
pattern for asyncio). On MySQL the upgrade holds ``GET_LOCK('iam_migrate')`` so
only one replica migrates at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from iam_grpc.storage.sql.database import reads_unbounded

__all__ = ["MigrationLockTimeout", "current", "downgrade", "head", "history", "upgrade"]

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_NAME = "iam_migrate"
LOCK_SECONDS = 60


class MigrationLockTimeout(Exception):
    """Another process held the migration lock for longer than the wait."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this code knows."""
    heads = ScriptDirectory.from_config(_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError("the migration history must have exactly one head")
    return heads[0]


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down_revision, message), newest first."""
    script = ScriptDirectory.from_config(_config())
    out: list[tuple[str, str | None, str]] = []
    for rev in script.walk_revisions():
        down = rev.down_revision if isinstance(rev.down_revision, str) or rev.down_revision is None else None
        out.append((rev.revision, down, rev.doc or ""))
    return out


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def _run(engine: AsyncEngine, action: Any) -> None:
    # GET_LOCK names are server-wide: scope ours to this database.
    lock = f"{engine.url.database or ''}:{LOCK_NAME}"[:64]
    async with engine.connect() as connection, reads_unbounded(connection):
        mysql = connection.dialect.name != "sqlite"
        if mysql:
            held = (
                await connection.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": lock, "t": LOCK_SECONDS})
            ).scalar()
            await connection.commit()
            if held != 1:
                raise MigrationLockTimeout()
        try:
            await connection.run_sync(action)
            await connection.commit()
        finally:
            if mysql:
                await connection.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": lock})
                await connection.commit()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run(engine, lambda connection: command.upgrade(_config(connection), revision))


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _run(engine, lambda connection: command.downgrade(_config(connection), revision))
