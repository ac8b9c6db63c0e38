"""The schema revision this code needs, readable without importing Alembic.

Alembic costs about 10 MB and a noticeable import time; a warm start only
needs to know that the database is already at :data:`HEAD`, which one query
answers. ``tests`` check that :data:`HEAD` is the migration history's head.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["HEAD", "database_revision"]

HEAD = "0003"


async def database_revision(engine: AsyncEngine) -> str | None:
    """The revision recorded in ``alembic_version`` (None for an empty database)."""
    async with engine.connect() as connection:
        try:
            row = (await connection.execute(text("SELECT version_num FROM alembic_version"))).first()
        except DBAPIError:
            await connection.rollback()
            return None  # no alembic_version table yet
    return str(row[0]) if row else None
