"""OpenTelemetry traces (tracing.enabled): one server span per RPC, named after the method and
continuing the caller's traceparent, storage spans inside it, the trace id on every log line of
the call; nothing when tracing is off (the default). Spans are read from an in-memory exporter
installed as the process's provider, which the service keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from loguru import logger
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from iam_grpc.config import ConfigError, load_settings
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.conftest import Backend
from tests.sessions_helper import new_session

EXPORTER = InMemorySpanExporter()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def installed_provider() -> TracerProvider:
    """The process's SDK provider with the in-memory exporter (installed once per process)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    if not getattr(current, "_iam_test_exporter", False):
        current.add_span_processor(SimpleSpanProcessor(EXPORTER))
        current._iam_test_exporter = True  # type: ignore[attr-defined]
    return current


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    installed_provider()
    env = {**backend.isolated(), "IAM_TRACING__ENABLED": "true"}
    async with running_service(tmp_path_factory.mktemp("tracing"), env) as running:
        yield running


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    sink = logger.add(lambda message: captured.append(message.record), level="DEBUG")
    yield captured
    logger.remove(sink)


def spans_of(trace_id: int) -> list[ReadableSpan]:
    return [
        s for s in EXPORTER.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id
    ]


def rpc_span(name: str, since: int) -> ReadableSpan:
    [span] = [s for s in EXPORTER.get_finished_spans()[since:] if s.name == name]
    return span


async def test_an_rpc_is_a_server_span_with_storage_spans_inside(
    iam: RunningService, records: list[dict[str, Any]]
) -> None:
    """RevokeAllSessions: a SERVER span named iam.v1.TokenService/RevokeAllSessions with status
    OK, the SQL statements (and Redis commands) it ran as its descendants, and every log line of
    the call bound to its trace id."""
    _, session = await new_session(iam.app)
    since = len(EXPORTER.get_finished_spans())
    async with iam.channel() as channel:
        await token_pb2_grpc.TokenServiceStub(channel).RevokeAllSessions(
            token_pb2.RevokeAllSessionsRequest(access_token=session.access_token)
        )
    span = rpc_span("iam.v1.TokenService/RevokeAllSessions", since)
    assert span.kind is SpanKind.SERVER
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.context is not None
    inside = [s for s in spans_of(span.context.trace_id) if s is not span]
    systems = {
        str((s.attributes or {}).get("db.system", (s.attributes or {}).get("db.system.name"))) for s in inside
    }
    assert {"sqlite", "mysql"} & systems, systems
    if iam.app.components.stores.redis is not None:
        assert "redis" in systems, systems
    trace_id = f"{span.context.trace_id:032x}"
    call_lines = [r for r in records if r["extra"].get("method") == "/iam.v1.TokenService/RevokeAllSessions"]
    assert call_lines, "the call logged nothing"
    assert {r["extra"].get("trace_id") for r in call_lines} == {trace_id}


async def test_a_callers_traceparent_is_continued(iam: RunningService, records: list[dict[str, Any]]) -> None:
    """W3C traceparent in the call's metadata: the server span joins that trace, and so do the logs."""
    _, session = await new_session(iam.app)
    since = len(EXPORTER.get_finished_spans())
    async with iam.channel() as channel:
        await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=session.access_token),
            metadata=(("traceparent", TRACEPARENT),),
        )
    span = rpc_span("iam.v1.TokenService/VerifyAccessToken", since)
    assert span.context is not None
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None
    assert span.parent.span_id == 0x00F067AA0BA902B7
    lines = [r for r in records if r["extra"].get("method") == "/iam.v1.TokenService/VerifyAccessToken"]
    assert lines
    assert {r["extra"].get("trace_id") for r in lines} == {TRACE_ID}


async def test_a_failed_rpc_span_carries_its_status(iam: RunningService) -> None:
    """A refused call (a forged token) ends its span with the gRPC code, UNAUTHENTICATED (16)."""
    since = len(EXPORTER.get_finished_spans())
    async with iam.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token="not-a-token")
            )
    span = rpc_span("iam.v1.TokenService/VerifyAccessToken", since)
    assert (span.attributes or {})["rpc.grpc.status_code"] == 16


async def test_without_the_setting_no_span_is_made(
    backend: Backend, tmp_path: Path, records: list[dict[str, Any]]
) -> None:
    """Tracing is off by default: no span, no trace id in the logs, even with a provider installed."""
    installed_provider()
    async with running_service(tmp_path, backend.isolated()) as other:
        since = len(EXPORTER.get_finished_spans())
        _, session = await new_session(other.app)
        async with other.channel() as channel:
            await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
            )
    assert [s.name for s in EXPORTER.get_finished_spans()[since:] if s.kind is SpanKind.SERVER] == []
    assert all("trace_id" not in r["extra"] for r in records)


def test_the_settings_are_validated() -> None:
    """Off by default; an endpoint is an http(s) URL; the ratio is between 0 and 1."""
    tracing = load_settings(environ={}).tracing
    assert (tracing.enabled, tracing.otlp_endpoint) == (False, None)
    on = load_settings(
        environ={"IAM_TRACING__ENABLED": "true", "IAM_TRACING__OTLP_ENDPOINT": "http://collector:4317"}
    ).tracing
    assert (on.enabled, on.otlp_endpoint) == (True, "http://collector:4317")
    for env in ({"IAM_TRACING__OTLP_ENDPOINT": "collector:4317"}, {"IAM_TRACING__SAMPLE_RATIO": "2"}):
        with pytest.raises(ConfigError):
            load_settings(environ=env)


def test_the_services_own_provider_starts_traces_at_rpcs_only() -> None:
    """Without a provider of the host, ours samples root SERVER spans (by the ratio) and drops
    root spans of anything else: a background job's SQL statement is not a trace of its own."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    from iam_grpc.tracing import _rpc_roots_sampler

    sampler = _rpc_roots_sampler()(TraceIdRatioBased(1.0))
    assert sampler.should_sample(None, 1, "x", SpanKind.SERVER).decision is Decision.RECORD_AND_SAMPLE
    assert sampler.should_sample(None, 1, "SELECT", SpanKind.CLIENT).decision is Decision.DROP
    none = _rpc_roots_sampler()(TraceIdRatioBased(0.0))
    assert none.should_sample(None, 1, "x", SpanKind.SERVER).decision is Decision.DROP
