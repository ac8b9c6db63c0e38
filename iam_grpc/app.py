"""The running service: its life cycle, and nothing else.

``Application`` opens the service in the documented order (behaviour.md 11.4), serves, and
drains and closes it (11.6). What it is made of is built by ``iam_grpc.wiring``; every part that
holds a resource is an async context manager entered into one ``AsyncExitStack``, so closing is
the stack unwinding, in the reverse order of opening::

    UNOPENED --start()--> STARTING --> RUNNING --stop()--> DRAINING --> CLOSED
                              \\--(failure: whatever was opened is closed)--> CLOSED

``async with Application(settings) as app:`` starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import gc
import sys
import time
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Self

import grpc

from iam_grpc.clock import Clock, SystemClock
from iam_grpc.config import Settings, join_host_port
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.keys import KeyRing
from iam_grpc.health import Readiness
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.ops_http import OpsHttpServer
from iam_grpc.ops_routes import Discovery, ops_routes
from iam_grpc.scheduler import Scheduler
from iam_grpc.secret_material import ResolvedSecrets, resolve_secrets
from iam_grpc.server import ListenError, build_server, served_services
from iam_grpc.storage.ports import MailError
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.tracing import MissingExtra, Tracing, open_tracing
from iam_grpc.wiring import Components, StartupError, build_components, open_database, open_stores
from iam_grpc.wiring.builders import build_keys, load_keys

__all__ = ["AppState", "Application", "StartupError"]

log = component_logger("iam.app")

PROBE_INTERVAL = 5.0


class AppState(enum.Enum):
    UNOPENED = "unopened"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


def give_back_startup_memory() -> None:
    """Once serving: collect what only startup needed (a migration's Alembic work, the parsed
    common-password list) and hand freed heap pages back to the system, so an idle replica's RSS
    is what serving needs (bench/README.md). Best effort, glibc only. (Alembic's modules stay
    imported: unloading them breaks a later migration in the same process.)"""
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class Application:
    """One service process: ``await start()`` then ``await stop()``, or ``async with``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        migrate_on_start: bool | None = None,
        probe_interval: float = PROBE_INTERVAL,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        self.worker = worker  # 0: the only process; 1..N: a pre-forked worker (iam_grpc.process)
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.failpoints = Failpoints(settings.test_failpoints)
        self.readiness = Readiness(self.metrics, served_services(settings))
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.http: OpsHttpServer | None = None
        self._migrate = settings.auto_migrate if migrate_on_start is None else migrate_on_start
        self._probe_interval = timedelta(seconds=probe_interval)
        self._state = AppState.UNOPENED
        self._stack = AsyncExitStack()
        self._components: Components | None = None
        # How the next close drains: zero unless stop() asks (a failed start closes at once).
        self._drain_delay = timedelta(0)
        self._grace = timedelta(0)

    @property
    def state(self) -> AppState:
        return self._state

    @property
    def components(self) -> Components:
        """The object graph; there from the end of a successful start."""
        if self._components is None:
            raise RuntimeError(f"the application has no components while {self._state.value}")
        return self._components

    # startup ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Steps 3-4 only (database, migrations, first key), then close: the parent of workers."""
        self._enter(AppState.UNOPENED, AppState.STARTING)
        try:
            async with AsyncExitStack() as stack:
                await self._open_keys(stack)
        finally:
            self._state = AppState.CLOSED

    async def start(self) -> None:
        self._enter(AppState.UNOPENED, AppState.STARTING)
        started = time.monotonic()
        try:
            components = await self._open(self._stack)
            await self._serve(self._stack, components)
        except BaseException:
            await self._stack.aclose()
            self._state = AppState.CLOSED
            raise
        self._components = components
        self._state = AppState.RUNNING
        give_back_startup_memory()
        s = self.settings
        log.bind(
            grpc=f"{s.server.host}:{self.grpc_port}",
            http=f"{s.http.host}:{self.http.port}" if self.http else None,
            mode=s.mode,
            startup_ms=round((time.monotonic() - started) * 1000),
        ).info("serving")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _enter(self, expected: AppState, then: AppState) -> None:
        if self._state is not expected:
            raise RuntimeError(f"cannot start an application that is {self._state.value}")
        self._state = then

    async def _open_keys(self, stack: AsyncExitStack) -> tuple[SqlDatabase, ResolvedSecrets, KeyRing]:
        """Steps 3-4: SQL (migrated) and the signing keys (the first one created if none)."""
        db = await open_database(self.settings, stack, self.metrics, migrate=self._migrate)
        secrets = resolve_secrets(self.settings)
        keys = build_keys(self.settings, db, self.clock, secrets.material)
        await load_keys(keys)
        return db, secrets, keys

    async def _open(self, stack: AsyncExitStack) -> Components:
        """Steps 3-5: SQL and keys, the ephemeral store, then the components holding resources."""
        s = self.settings
        db, secrets, keys = await self._open_keys(stack)
        stores = await open_stores(s, db, self.clock, stack)
        c = build_components(
            s,
            stores,
            self.clock,
            secrets=secrets,
            keys=keys,
            metrics=self.metrics,
            failpoints=self.failpoints,
        )
        await stack.enter_async_context(c.audit)  # leaving waits for audit rows written in the background
        # A restarted in-process store or a flushed Redis forgets nothing: verified or rebuilt now.
        await stack.enter_async_context(c.denylist)
        async with db.transaction() as tx:
            await tx.users.ensure_roles(s.roles.default, self.clock.now())
        await stack.enter_async_context(c.hashing)  # the pool and its dummy hash
        await stack.enter_async_context(c.breached)
        await stack.enter_async_context(c.geo)
        try:
            await c.transport.check()
        except MailError as exc:
            log.bind(error=exc.summary).warning("mail transport not reachable; mail waits in the outbox")
        return c

    def _open_tracing(self, c: Components) -> Tracing | None:
        redis = c.stores.redis.client if c.stores.redis is not None else None
        try:
            return open_tracing(self.settings.tracing, c.db.statement_engines, redis)
        except MissingExtra as exc:
            raise StartupError(f"tracing.enabled (IAM_TRACING__ENABLED): {exc}") from None

    def _ops_base_url(self) -> str:
        """``http.public_url``, else where the ops listener listens (a wildcard host as localhost)."""
        s = self.settings.http
        if s.public_url:
            return s.public_url
        host = "localhost" if s.host in ("", "0.0.0.0", "::", "[::]") else s.host  # noqa: S104
        return "http://" + join_host_port(host, self.http.port if self.http else s.port)

    async def _serve(self, stack: AsyncExitStack, c: Components) -> None:
        """Step 6: the ops listener, the outbox sender, the gRPC server, the background jobs, then
        SERVING. Closing runs it backwards: jobs stop, health drains, the server lets calls finish,
        the sender releases its claims, the listener closes."""
        s = self.settings
        await self.readiness.not_serving_yet()
        if s.http.enabled:
            # Pre-forked worker k listens on http.port + k - 1, so each can be scraped on its own.
            port = s.http.port + self.worker - 1 if self.worker and s.http.port else s.http.port
            discovery = Discovery(s.tokens.issuer, s.tokens.algorithm, self._ops_base_url)
            routes = ops_routes(self.readiness, self.metrics, c.keys, s.keys.jwks_max_age, discovery)
            try:
                self.http = await stack.enter_async_context(OpsHttpServer(routes, s.http.host, port))
            except OSError:
                where = join_host_port(s.http.host, port)
                raise StartupError(
                    f"http.host/http.port (IAM_HTTP_LISTEN): cannot listen on {where}"
                ) from None
        await stack.enter_async_context(c.sender)
        tracing = self._open_tracing(c)
        if tracing is not None:
            stack.callback(tracing.close)
        await stack.enter_async_context(c.events)  # the event poller; its position is taken here
        for sink in (c.event_sinks.webhooks, c.event_sinks.nats):
            if sink is not None:
                await stack.enter_async_context(sink)
        try:
            self.server, self.grpc_port = build_server(
                c, self.readiness.servicer, tracing.interceptors() if tracing else ()
            )
        except ListenError as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(self._stop_server, self.server)
        # after the server has stopped: the last noted API-token uses are written
        stack.push_async_callback(self._flush_api_token_use, c)
        await self.server.start()
        stack.push_async_callback(c.events.end_watches)  # after the drain delay, before the grace
        stack.push_async_callback(self._drain)
        jobs = Scheduler()
        jobs.every("health-probe", self._probe_interval, self.readiness.probe_once, jitter=0.0)
        jobs.every("keys", s.keys.reload_interval, c.keys.maintain)
        jobs.every("deny-list", s.tokens.denylist_replay, c.denylist.replay)
        jobs.every("cleanup", s.cleanup.interval, c.cleanup.run)
        jobs.every("api-token-use", s.api_tokens.last_used_flush, c.api_tokens.flush_use)
        jobs.every("events-retention", s.cleanup.interval, c.events.purge_expired)
        await stack.enter_async_context(jobs)
        await self.readiness.start_serving(c)

    @staticmethod
    async def _flush_api_token_use(c: Components) -> None:
        try:
            await c.api_tokens.flush_use()
        except Exception:  # shutdown goes on; these timestamps are advisory
            log.warning("last API-token uses not written at shutdown")

    # shutdown -----------------------------------------------------------------------------------

    async def stop(self, *, drain_delay: timedelta | None = None, grace: timedelta | None = None) -> None:
        """Drain: NOT_SERVING, wait for balancers, let calls in flight finish, close everything."""
        if self._state is AppState.UNOPENED:
            self._state = AppState.CLOSED
        if self._state is not AppState.RUNNING:
            return
        self._state = AppState.DRAINING
        shutdown = self.settings.shutdown
        self._drain_delay = shutdown.drain_delay if drain_delay is None else drain_delay
        self._grace = shutdown.grace if grace is None else grace
        try:
            await self._stack.aclose()
        finally:
            self._state = AppState.CLOSED
        log.info("stopped")

    async def _drain(self) -> None:
        await self.readiness.drain()
        delay = self._drain_delay.total_seconds()
        if delay > 0:
            log.bind(seconds=delay).info("draining")
            await asyncio.sleep(delay)

    async def _stop_server(self, server: grpc.aio.Server) -> None:
        await server.stop(self._grace.total_seconds())
