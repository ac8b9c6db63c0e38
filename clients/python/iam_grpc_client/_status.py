"""Decoding the rich error details of a failed call (``google.rpc.Status`` in
the ``grpc-status-details-bin`` trailer): for clients and tests alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc

__all__ = ["ErrorDetails", "error_details"]


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
