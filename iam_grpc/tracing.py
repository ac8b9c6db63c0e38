"""Optional OpenTelemetry traces (``tracing.enabled``; the ``otel`` extra), off by default.

When on, every RPC is a server span (opentelemetry-instrumentation-grpc's aio interceptor, named
``package.Service/Method``, continuing a caller's ``traceparent``), every SQL statement a child
span (SQLAlchemy's engine tracer, on this process's engines only) and every Redis command too
(the Redis instrumentation, on this process's client only); each log line of the call carries
``trace_id`` and ``span_id``. Spans go to an OTLP/gRPC collector when ``tracing.otlp_endpoint`` is
set and nowhere otherwise (the log lines still get their ids).

A process that already installed an SDK ``TracerProvider`` (an embedding application, a test
with an in-memory exporter) keeps it; otherwise one is created and installed globally, since
libraries find the provider there. Nothing is imported from OpenTelemetry while tracing is off.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
from loguru import logger

from iam_grpc.config import TracingSettings
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy.engine import Engine

__all__ = ["MissingExtra", "Tracing", "open_tracing"]


class MissingExtra(RuntimeError):
    """tracing.enabled without the OpenTelemetry packages installed."""


class TraceLogInterceptor(UnaryInterceptor):
    """Binds the current span's ids to every log line of the call (inside the RPC's span)."""

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        from opentelemetry import trace

        name = method.lstrip("/")  # the semantic conventions' package.Service/Method

        async def run(request: Any, context: Context) -> Any:
            current = trace.get_current_span()
            span = current.get_span_context()
            if not span.is_valid:
                return await behaviour(request, context)
            current.update_name(name)
            with logger.contextualize(trace_id=f"{span.trace_id:032x}", span_id=f"{span.span_id:016x}"):
                return await behaviour(request, context)

        return run


def _rpc_roots_sampler() -> type:
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind

    class RpcRoots(Sampler):
        """Traces start at RPCs only: a statement of a background job (the health probe's
        SELECT 1 every few seconds, the cleanup) would otherwise be a trace of its own."""

        def __init__(self, ratio: Sampler) -> None:
            self._ratio = ratio

        def should_sample(
            self, parent_context: Any, trace_id: int, name: str, kind: Any = None, *args: Any, **kw: Any
        ) -> Any:
            if kind is not SpanKind.SERVER:
                return SamplingResult(Decision.DROP)
            return self._ratio.should_sample(parent_context, trace_id, name, kind, *args, **kw)

        def get_description(self) -> str:
            return f"RpcRoots({self._ratio.get_description()})"

    return RpcRoots


def _provider(settings: TracingSettings) -> TracerProvider:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    _RpcRoots = _rpc_roots_sampler()

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(_RpcRoots(TraceIdRatioBased(settings.sample_ratio))),
    )
    if settings.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, insecure=settings.otlp_endpoint.startswith("http://")
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


class Tracing:
    """The tracer provider and what it instruments for one Application; ``close`` undoes it."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracers: list[Any] = []  # the engines' listeners go with the engines, disposed at close
        self._redis: list[Any] = []

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Outermost first: the RPC's span, then the log binding inside it."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        span_interceptor = aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        return [span_interceptor, TraceLogInterceptor()]

    def instrument_sql(self, engines: Iterable[Engine]) -> None:
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import NoOpMeterProvider

        tracer = self.provider.get_tracer("iam_grpc.storage.sql")
        usage = (
            NoOpMeterProvider().get_meter("iam_grpc").create_up_down_counter("db.client.connections.usage")
        )
        for engine in engines:
            self._tracers.append(EngineTracer(tracer, engine, usage))  # type: ignore[no-untyped-call]

    def instrument_redis(self, client: Any) -> None:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor.instrument_client(client, tracer_provider=self.provider)
        self._redis.append(client)

    def close(self) -> None:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        for client in self._redis:
            RedisInstrumentor.uninstrument_client(client)
        self._redis.clear()
        self.provider.force_flush(timeout_millis=2000)


def open_tracing(
    settings: TracingSettings, sql_engines: Iterable[Engine], redis_client: Any
) -> Tracing | None:
    """None when tracing is off; raises MissingExtra when it is on but not installed."""
    if not settings.enabled:
        return None
    try:
        import opentelemetry.instrumentation.grpc
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise MissingExtra(
            "tracing.enabled needs the OpenTelemetry packages: pip install 'iam-grpc[otel]'"
        ) from None
    tracing = Tracing(_provider(settings))
    tracing.instrument_sql(sql_engines)
    if redis_client is not None:
        tracing.instrument_redis(redis_client)
    return tracing
