"""What the table stores need from a connection, and the embedded mode's inline SQLite connection.

The stores are written against :class:`SqlConnection`: ``await execute(statement)`` and
``begin_nested()``. On MySQL that is SQLAlchemy's ``AsyncConnection`` (asyncmy, real network
I/O). On SQLite it is :class:`InlineConnection`: a synchronous pysqlite connection called on the
event loop. A SQLite statement on a local file takes tens of microseconds, while aiosqlite hands
every cursor call to its thread and back (about 0.25 ms of CPU per statement; seven times the
cost of the statement itself, measured in bench/README.md). Blocking the loop for the statement is
cheaper than the hand-off, with two rules that keep it short:

- the writer waits for SQLite's write lock on the loop, never inside SQLite: ``busy_timeout`` is
  a few milliseconds and ``BEGIN IMMEDIATE`` is retried with ``asyncio.sleep`` (another process,
  such as the CLI, may hold the lock for a while);
- this process's writers are already queued one at a time by ``SqlDatabase``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, CursorResult, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.base import Executable

__all__ = ["InlineConnection", "SqlConnection", "begin_inline", "inline_sqlite_engine"]

_BUSY_MS = 5  # the longest SQLite may block the loop waiting for a lock held elsewhere
_RETRY_FIRST = 0.002
_RETRY_MAX = 0.1


class SqlConnection(Protocol):
    """The part of a connection the table stores use."""

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]: ...

    def begin_nested(self) -> AbstractAsyncContextManager[Any]: ...


class InlineConnection:
    """A synchronous SQLAlchemy connection behind the :class:`SqlConnection` interface."""

    def __init__(self, connection: Connection) -> None:
        self.sync = connection

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]:
        return self.sync.execute(statement, parameters)

    @asynccontextmanager
    async def _nested(self) -> AsyncIterator[None]:
        with self.sync.begin_nested():
            yield

    def begin_nested(self) -> AbstractAsyncContextManager[None]:
        return self._nested()


def inline_sqlite_engine(url: URL, *, on_statement: Any = None) -> Engine:
    """A pysqlite engine on the same file as the aiosqlite one (migrations keep using that)."""
    engine = create_sync_engine(
        url.set(drivername="sqlite"),
        connect_args={"timeout": _BUSY_MS / 1000, "check_same_thread": False},
        # Never wait for a pooled connection: only this loop gives them back, so a checkout that
        # blocked the loop could never be satisfied. Extra connections are cheap file handles.
        max_overflow=-1,
        hide_parameters=True,  # as database.create_engine: no row value in an error's text
    )

    @event.listens_for(engine, "connect")
    def _setup(dbapi_connection: Any, _record: Any) -> None:
        # As for the aiosqlite engine (database.create_engine), with a short busy timeout.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    if on_statement is not None:
        event.listen(engine, "before_cursor_execute", lambda *_args: on_statement())
    return engine


async def begin_inline(connection: Connection, *, read_only: bool, wait: timedelta) -> None:
    """Open the transaction (``BEGIN`` or ``BEGIN IMMEDIATE``), waiting for a lock held by another
    process on the loop, with growing sleeps, for at most ``wait``; then OperationalError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait.total_seconds()
    delay = _RETRY_FIRST
    while True:
        try:
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
            return
        except OperationalError as exc:
            if "locked" not in str(exc.orig) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX)
