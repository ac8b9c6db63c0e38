"""The SQL adapter: one SQLAlchemy async engine (aiosqlite or asyncmy) and a
unit of work per transaction. Dialect differences (locks, ``SKIP LOCKED``,
connection setup) live here and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine, UniqueConstraint, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from iam_grpc.errors import BackendUnavailable, InvalidArgument
from iam_grpc.logging import component_logger
from iam_grpc.storage.breaker import Breaker
from iam_grpc.storage.loop_lag import patient_timeout
from iam_grpc.storage.ports import Conflict
from iam_grpc.storage.sql.api_tokens import SqlApiTokenStore
from iam_grpc.storage.sql.audit import SqlAuditLog
from iam_grpc.storage.sql.connection import (
    InlineConnection,
    SqlConnection,
    begin_inline,
    inline_sqlite_engine,
)
from iam_grpc.storage.sql.credentials import SqlIdentityStore, SqlPasskeyStore
from iam_grpc.storage.sql.devices import SqlDeviceStore
from iam_grpc.storage.sql.directory import SqlDirectory
from iam_grpc.storage.sql.events import SqlEventLog
from iam_grpc.storage.sql.keys import SqlKeyStore
from iam_grpc.storage.sql.maintenance import SqlMaintenance
from iam_grpc.storage.sql.outbox import SqlOutbox
from iam_grpc.storage.sql.revocations import SqlRevocationStore
from iam_grpc.storage.sql.sessions import SqlSessionStore
from iam_grpc.storage.sql.tables import metadata
from iam_grpc.storage.sql.totp import SqlTotpStore
from iam_grpc.storage.sql.users import SqlUserStore

__all__ = [
    "ACCESS_DENIED_CODES",
    "DATA_ERROR_CODES",
    "SqlDatabase",
    "SqlTransaction",
    "create_engine",
    "driver_error_code",
    "reads_unbounded",
]

MYSQL_SQL_MODE = (
    "STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
)

# unique constraint name -> "table.column" (MySQL reports the key name, SQLite the columns)
_UNIQUE_NAMES: dict[str, str] = {}
for _table in metadata.tables.values():
    for _constraint in _table.constraints:
        if isinstance(_constraint, UniqueConstraint) and _constraint.name:
            _UNIQUE_NAMES[str(_constraint.name)] = f"{_table.name}." + ",".join(
                c.name for c in _constraint.columns
            )

_MYSQL_DUP = re.compile(r"Duplicate entry .* for key '(?:[\w]+\.)?([\w]+)'")
_SQLITE_DUP = re.compile(r"UNIQUE constraint failed: ([\w.]+(?:, [\w.]+)*)")
_INSERT_TABLE = re.compile(r"^\s*INSERT\s+INTO\s+`?(\w+)`?", re.IGNORECASE)
_PRIMARY = {t.name: ",".join(c.name for c in t.primary_key.columns) for t in metadata.tables.values()}

# MySQL/MariaDB client error codes that no retry will fix (bad credentials, unknown database).
ACCESS_DENIED_CODES = frozenset({1044, 1045, 1049, 1698})
# Server errors (below 2000) are answers from a live server, such as a lock wait time-out or a
# deadlock, and do not count toward the breaker; these few say the server is going or full.
_SERVER_DOWN_CODES = frozenset({1040, 1053, 1927})  # too many connections, shutdown, killed


def _connection_failure(exc: BackendUnavailable) -> bool:
    """Whether a mapped failure means the server could not be reached or did not answer (client
    errors 2xxx such as 2013 lost connection, time-outs, socket errors, an exhausted pool)."""
    code = driver_error_code(exc.__cause__) if exc.__cause__ is not None else None
    return code is None or code >= 2000 or code in _SERVER_DOWN_CODES


@asynccontextmanager
async def reads_unbounded(connection: AsyncConnection) -> AsyncIterator[None]:
    """Lift the driver's read time-out for statements that wait on purpose (GET_LOCK) or may run
    long (migrations)."""
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    saved = getattr(driver, "_read_timeout", None)
    if saved is None:
        yield
        return
    driver._read_timeout = None
    try:
        yield
    finally:
        driver._read_timeout = saved


# MySQL/MariaDB errors about a value its column cannot hold: out of range (1264), truncated (1265),
# not valid text for the column's character set (1300, 1366, 1367), too long (1406).
DATA_ERROR_CODES = frozenset({1264, 1265, 1300, 1366, 1367, 1406})
_COLUMN = re.compile(r"for column [`']?(?:\w+[`']?\.[`']?)*(\w+)[`']?")

log = component_logger("iam.sql")


def _conflict(exc: IntegrityError) -> Conflict | None:
    """Name the violated constraint the same way on every engine: ``table.column[,column]``,
    and ``table.primary`` for a primary key."""
    message = str(exc.orig)
    match = _MYSQL_DUP.search(message)
    if match:
        name = match.group(1)
        if name == "PRIMARY":
            insert_into = _INSERT_TABLE.match(exc.statement or "")
            return Conflict(f"{insert_into.group(1) if insert_into else 'unknown'}.primary")
        return Conflict(_UNIQUE_NAMES.get(name, name))
    match = _SQLITE_DUP.search(message)
    if match:
        columns = match.group(1).replace(", ", ",")
        table = columns.split(".", 1)[0]
        bare = ",".join(part.split(".", 1)[-1] for part in columns.split(","))
        return Conflict(f"{table}.primary" if _PRIMARY.get(table) == bare else columns)
    return None


def driver_error_code(exc: BaseException) -> int | None:
    """The driver's numeric error code behind a database error (MySQL: 1045 access denied...)."""
    orig = getattr(exc, "orig", None)
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _checkout_timeout(seconds: float | None) -> contextlib.AbstractAsyncContextManager[None]:
    """The wait for a pooled connection, not counting the time the event loop was late."""
    return patient_timeout(seconds) if seconds else contextlib.nullcontext()


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    pool_recycle: timedelta = timedelta(seconds=1800),
    pool_pre_ping: bool = True,
    connect_timeout: timedelta = timedelta(seconds=10),
    statement_timeout: timedelta | None = None,
) -> AsyncEngine:
    """An async engine with our connection rules: UTC and strict mode on MySQL; WAL and FKs on SQLite.

    Every engine hides statement parameters: a driver error's text (and so a logged traceback)
    would otherwise carry the row's values, a password hash, a name or an address among them.
    ``statement_timeout`` (MySQL through asyncmy) bounds every wait for the server's answer, and
    the wait for a free pooled connection: a stalled server then fails a call within it instead
    of holding it to the caller's deadline."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            path = Path(database)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                # Created private before SQLite opens it; its -wal and -shm files copy these permissions.
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_async_engine(
            url, connect_args={"timeout": connect_timeout.total_seconds()}, hide_parameters=True
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_setup(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the driver (which only BEGINs at the first write):
            # every transaction starts with BEGIN IMMEDIATE below, so a read-modify-write in one
            # transaction can never interleave with another's (SQLAlchemy's documented recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Read-only transactions take no write lock (WAL readers never wait for the writer).
            read_only = connection.get_execution_options().get("iam_read_only", False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() != "mysql":
        raise ValueError("database.url must be SQLite or MySQL/MariaDB")
    if "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    connect_args: dict[str, Any] = {
        "init_command": f"SET time_zone='+00:00', sql_mode='{MYSQL_SQL_MODE}'",
        "connect_timeout": connect_timeout.total_seconds(),
    }
    pool_timeout = connect_timeout.total_seconds()
    if statement_timeout is not None and statement_timeout.total_seconds() > 0:
        pool_timeout = min(pool_timeout, statement_timeout.total_seconds())
        if parsed.get_driver_name() == "asyncmy":
            connect_args["read_timeout"] = statement_timeout.total_seconds()
    return create_async_engine(
        parsed,
        hide_parameters=True,
        # READ COMMITTED: no gap locks, so claiming the outbox (FOR UPDATE SKIP LOCKED) and inserting
        # into it do not deadlock; every decision that races relies on conditional UPDATEs anyway.
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=int(pool_recycle.total_seconds()),
        pool_pre_ping=pool_pre_ping,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
    )


@asynccontextmanager
async def _mapped_errors() -> AsyncIterator[None]:
    """Driver errors as the port's: a unique violation -> Conflict, a lost or unreachable
    database -> BackendUnavailable."""
    try:
        yield
    except IntegrityError as exc:
        conflict = _conflict(exc)
        if conflict is not None:
            raise conflict from exc
        raise
    except (OperationalError, InterfaceError, OSError, TimeoutError, PoolTimeout) as exc:
        raise BackendUnavailable() from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise BackendUnavailable() from exc
        if isinstance(exc, DataError) or driver_error_code(exc) in DATA_ERROR_CODES:
            raise _value_refused(exc) from None
        raise


def _value_refused(exc: DBAPIError) -> InvalidArgument:
    """The backstop behind the input rules: a value the database cannot store is the request's
    fault, never INTERNAL. The caller learns no column; the log gets the driver code and column
    name only (the driver's message may quote the value, and the parameters are the row)."""
    column = _COLUMN.search(str(exc.orig))
    log.bind(driver_code=driver_error_code(exc), column=column.group(1) if column else None).warning(
        "the database refused a value the input rules let through"
    )
    return InvalidArgument.one("request", "a value is too long or cannot be stored")


class SqlTransaction:
    """One connection inside one transaction, with a store per table family."""

    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self.connection = connection
        self.users = SqlUserStore(connection, dialect)
        self.devices = SqlDeviceStore(connection, dialect)
        self.sessions = SqlSessionStore(connection)
        self.keys = SqlKeyStore(connection)
        self.outbox = SqlOutbox(connection, dialect)
        self.audit = SqlAuditLog(connection)
        self.maintenance = SqlMaintenance(connection)
        self.revocations = SqlRevocationStore(connection, dialect)
        self.passkeys = SqlPasskeyStore(connection)
        self.identities = SqlIdentityStore(connection)
        self.totp = SqlTotpStore(connection)
        self.api_tokens = SqlApiTokenStore(connection)
        self.directory = SqlDirectory(connection)
        self.events = SqlEventLog(connection, dialect)
        self.committed: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)


class SqlDatabase:
    """The :class:`~iam_grpc.storage.ports.Database` port over SQLAlchemy Core."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_statement: Callable[[], None] | None = None,
        lock_wait: timedelta = timedelta(seconds=10),
        checkout_timeout: timedelta | None = None,
    ) -> None:
        self.engine = engine
        # MySQL: the longest a call waits for a usable connection, pre-ping and reconnection
        # included (without it a stalled server costs the ping's time-out plus the reconnect's).
        self._checkout = checkout_timeout.total_seconds() if checkout_timeout else None
        self._dialect = "sqlite" if engine.dialect.name == "sqlite" else "mysql"
        # SQLite: transactions run on a synchronous connection on the loop (see connection.py);
        # the async engine stays for migrations and schema checks.
        self._inline: Engine | None = None
        if self._dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._inline = inline_sqlite_engine(engine.url, on_statement=on_statement)
        self._lock_wait = lock_wait
        # MySQL locks are server-wide: qualify names with the database so two schemas never share one.
        self._lock_scope = engine.url.database or ""
        self._local_locks: dict[str, asyncio.Lock] = {}
        # SQLite has one writer. Queue this process's writers here, first come first served, rather
        # than in SQLite's busy handler, which polls with sleeps of up to 100 ms and collapses
        # throughput under contention (other processes, such as the CLI, still meet busy_timeout).
        self._writer = asyncio.Lock()
        if on_statement is not None:
            event.listen(engine.sync_engine, "before_cursor_execute", lambda *_args: on_statement())
        # MySQL only: SQLite is a local file, with nothing to wait for.
        self.breaker = Breaker("sql", self.ping) if self._dialect == "mysql" else None

    @property
    def statement_engines(self) -> tuple[Engine, ...]:
        """The engines that run statements (for instrumentation): SQLite's inline one too."""
        return (self.engine.sync_engine,) if self._inline is None else (self._inline, self.engine.sync_engine)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SqlDatabase:
        on_statement = options.pop("on_statement", None)
        return cls(
            create_engine(url, **options),
            on_statement=on_statement,
            checkout_timeout=options.get("statement_timeout"),
        )

    @property
    def dialect(self) -> str:
        return self._dialect

    @asynccontextmanager
    async def _connection(self, *, probe: bool = False) -> AsyncIterator[AsyncConnection]:
        """A pooled connection; fails at once while the breaker is open (a probe goes through)."""
        breaker = self.breaker
        if breaker is None:
            async with _mapped_errors(), self.engine.connect() as connection:
                yield connection
            return
        if not probe:
            breaker.allow()
        try:
            async with _mapped_errors(), contextlib.AsyncExitStack() as stack:
                async with _checkout_timeout(self._checkout):
                    connection = await stack.enter_async_context(self.engine.connect())
                yield connection
        except BackendUnavailable as exc:
            if _connection_failure(exc):
                breaker.failed()
            raise
        except Exception:
            breaker.succeeded()  # the server answered; the call failed for its own reasons
            raise
        breaker.succeeded()

    @asynccontextmanager
    async def _transaction(self, read_only: bool, *, probe: bool = False) -> AsyncIterator[SqlTransaction]:
        if self._inline is not None:
            async with self._inline_transaction(read_only) as tx:
                yield tx
        else:
            async with self._connection(probe=probe) as connection:
                if read_only:
                    await connection.execution_options(iam_read_only=True)
                tx = SqlTransaction(connection, self._dialect)
                async with connection.begin():
                    yield tx
        for callback in tx.committed:
            callback()

    @asynccontextmanager
    async def _inline_transaction(self, read_only: bool) -> AsyncIterator[SqlTransaction]:
        assert self._inline is not None
        async with _mapped_errors():
            # SQLAlchemy's transaction does the bookkeeping (COMMIT at the end, ROLLBACK on any
            # exception, and also when the COMMIT itself fails, so a connection never goes back
            # to the pool inside a transaction holding the write lock); SQLite's BEGIN is ours.
            with self._inline.connect() as connection, connection.begin():
                await begin_inline(connection, read_only=read_only, wait=self._lock_wait)
                yield SqlTransaction(InlineConnection(connection), self._dialect)

    @asynccontextmanager
    async def _serialised(self, read_only: bool) -> AsyncIterator[SqlTransaction]:
        if self._dialect != "sqlite" or read_only:
            async with self._transaction(read_only) as tx:
                yield tx
            return
        async with self._writer, self._transaction(read_only) as tx:
            yield tx

    def transaction(self, *, read_only: bool = False) -> AbstractAsyncContextManager[SqlTransaction]:
        return self._serialised(read_only)

    @asynccontextmanager
    async def _named_lock(self, name: str, timeout: timedelta) -> AsyncIterator[bool]:
        if self._dialect == "sqlite":
            lock = self._local_locks.setdefault(name, asyncio.Lock())
            try:
                await asyncio.wait_for(lock.acquire(), timeout.total_seconds())
            except TimeoutError:
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
            return
        async with self._connection() as connection:
            async with reads_unbounded(connection):
                held = (
                    await connection.execute(
                        text("SELECT GET_LOCK(:name, :timeout)"),
                        {"name": self.lock_name(name), "timeout": int(timeout.total_seconds())},
                    )
                ).scalar()
            await connection.commit()
            try:
                yield held == 1
            finally:
                if held == 1:
                    await connection.execute(
                        text("SELECT RELEASE_LOCK(:name)"), {"name": self.lock_name(name)}
                    )
                    await connection.commit()

    def lock_name(self, name: str) -> str:
        """MySQL lock names are at most 64 characters and shared by the whole server."""
        return f"{self._lock_scope}:{name}"[:64]

    def named_lock(self, name: str, timeout: timedelta) -> AbstractAsyncContextManager[bool]:
        return self._named_lock(name, timeout)

    async def ping(self) -> None:
        """One trivial query, sent even while the breaker is open (the health probe asks the
        server itself); its success closes the breaker."""
        async with self._transaction(True, probe=True) as tx:
            await tx.connection.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self.breaker is not None:
            await self.breaker.close()
        if self._inline is not None:
            self._inline.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
