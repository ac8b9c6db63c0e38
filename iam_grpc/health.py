"""Readiness (behaviour.md 11.5): the gRPC health status of a running service, and what
``/healthz`` and ``iam_dependency_state`` report.

The status is SERVING once the service started and until it drains; three failed SQL probes in
a row make it NOT_SERVING, one success SERVING again. The ephemeral store (Redis) does not count:
without it every RPC still answers correctly from its documented fallback (SQL deny-list, local
limits), and taking every replica out of the balancer because a shared Redis blinked would turn a
degradation into an outage. Each dependency's own state (``up``, ``degraded``, ``down``) is
reported apart from readiness (``iam_grpc.dependencies``).
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from iam_grpc.dependencies import Dependencies, ObservedTransport, ProbedDependency
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.storage.loop_lag import patient_timeout
from iam_grpc.wiring import Components

__all__ = ["PROBE_FAILURES", "Readiness"]

log = component_logger("iam.app")

PROBE_FAILURES = 3
_PROBE_TIMEOUT = 2.0


class Readiness:
    def __init__(self, metrics: Metrics, services: Sequence[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.dependencies = Dependencies(metrics)
        self._metrics = metrics
        self._names = ("", *services)
        self._serving = False
        self._draining = False
        self._failures = 0
        self._sql_answers = True
        self._components: Components | None = None
        self._probed: dict[str, ProbedDependency] = {}

    @property
    def serving(self) -> bool:
        return self._serving and not self._draining

    async def not_serving_yet(self) -> None:
        """Before the server starts: every service name answers NOT_SERVING."""
        for name in self._names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start_serving(self, components: Components) -> None:
        """Track the dependencies of ``components`` and report SERVING."""
        self._components = components
        self._track(components)
        await self._set_serving(True)

    async def drain(self) -> None:
        """NOT_SERVING for good: the service is shutting down."""
        self._draining = True
        await self._set_serving(False)

    def _track(self, components: Components) -> None:
        self._probed["sql"] = sql = ProbedDependency(components.db.breaker)
        self.dependencies.track("sql", sql.state)
        redis = components.stores.redis
        if redis is not None:
            cache = components.denylist.cache
            self._probed["ephemeral"] = shared = ProbedDependency(
                redis.breaker, trusted=lambda: cache.trusted
            )
            self.dependencies.track("redis", shared.state)
        if isinstance(components.transport, ObservedTransport):
            self.dependencies.track("smtp", components.transport.state)

    async def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self.servicer.set(name, status)
        self._metrics.serving.set(1 if self.serving else 0)

    async def check_stores(self) -> bool:
        """Probe SQL and the ephemeral store; True when both answer."""
        if self._components is None:
            return False
        ok = True
        for store, probe in (("sql", self._components.db), ("ephemeral", self._components.ephemeral)):
            try:
                async with patient_timeout(_PROBE_TIMEOUT):  # a late loop is no failed store
                    await probe.ping()
                answered = True
            except (BackendUnavailable, TimeoutError):
                self._metrics.store_failures.labels(store).inc()
                log.bind(store=store).warning("store health probe failed")
                answered = ok = False
            if store == "sql":
                self._sql_answers = answered
            if store in self._probed:
                self._probed[store].probed(answered)
        return ok

    async def probe_once(self) -> None:
        """One health probe: PROBE_FAILURES SQL failures in a row mean NOT_SERVING, one success
        SERVING again."""
        await self.check_stores()
        if self._draining:
            return
        if self._sql_answers:
            self._failures = 0
            if not self._serving:
                log.info("stores answer again; serving")
                await self._set_serving(True)
            return
        self._failures += 1
        if self._failures >= PROBE_FAILURES and self._serving:
            log.error("database failing; reporting NOT_SERVING")
            await self._set_serving(False)
