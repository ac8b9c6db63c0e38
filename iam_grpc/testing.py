"""Test helpers for services that call iam-grpc: run the real service in your
test's event loop, on free ports, against a throw-away data directory.

    async with running_service(tmp_path) as iam:
        async with iam.channel() as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            ...

Nothing here is mocked: it is the same server ``iam-grpc serve`` runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from iam_grpc.app import Application
from iam_grpc.clock import Clock
from iam_grpc.config import Settings, load_settings

__all__ = ["ErrorDetails", "RunningService", "error_details", "running_service", "service_settings"]


def service_settings(data_dir: Path, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings for a test instance: free ports, files under ``data_dir``, quick shutdown."""
    env = {
        "IAM_DATA_DIR": str(data_dir),
        "IAM_GRPC_LISTEN": "127.0.0.1:0",
        "IAM_HTTP_LISTEN": "127.0.0.1:0",
        "IAM_SHUTDOWN__DRAIN_DELAY": "0",
        "IAM_SHUTDOWN__GRACE": "2",
    }
    env.update(environ or {})
    return load_settings(environ=env, **overrides)


@dataclass
class RunningService:
    app: Application

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def http_port(self) -> int | None:
        return self.app.http.port if self.app.http else None

    def channel(self, **options: Any) -> grpc.aio.Channel:
        """A plaintext channel to the service (use ``async with``)."""
        return grpc.aio.insecure_channel(self.address, **options)


@asynccontextmanager
async def running_service(
    data_dir: Path,
    environ: Mapping[str, str] | None = None,
    *,
    settings: Settings | None = None,
    clock: Clock | None = None,
    probe_interval: float = 5.0,
) -> AsyncIterator[RunningService]:
    """Start the service, yield it, and stop it (without the production drain delay)."""
    app = Application(
        settings or service_settings(data_dir, environ), clock=clock, probe_interval=probe_interval
    )
    await app.start()
    try:
        yield RunningService(app)
    finally:
        await app.stop(drain_delay=timedelta(0), grace=timedelta(seconds=1))


@dataclass(frozen=True)
class ErrorDetails:
    """The rich details of a failed call (google.rpc.Status from the trailers)."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    field_violations: dict[str, str]
    retry_delay: timedelta | None
    raw_status: bytes


def error_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Decode ``ErrorInfo``, ``BadRequest`` and ``RetryInfo`` from a failed call."""
    from google.rpc import error_details_pb2, status_pb2

    raw = b""
    trailers: Any = error.trailing_metadata() or ()  # grpc.aio.Metadata or a tuple of pairs
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            raw = value
    status = status_pb2.Status.FromString(raw)
    reason = domain = None
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    retry: timedelta | None = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad):
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Unpack(retry_info):
            retry = retry_info.retry_delay.ToTimedelta()
    return ErrorDetails(
        code=error.code(),
        message=error.details() or "",
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_delay=retry,
        raw_status=raw,
    )
