"""Errors raised by the client library: one class carrying the service's reason."""

from __future__ import annotations

from datetime import timedelta

import grpc

from iam_grpc_client._status import error_details

__all__ = ["IamCallError", "from_rpc_error"]


class IamCallError(Exception):
    """A failed call: ``code`` (gRPC), ``reason`` (ErrorInfo), ``metadata``, field violations, retry delay."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str = "",
        *,
        metadata: dict[str, str] | None = None,
        field_violations: dict[str, str] | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = dict(field_violations or {})
        self.retry_after = retry_after


def from_rpc_error(error: grpc.aio.AioRpcError) -> IamCallError:
    details = error_details(error)
    return IamCallError(
        details.code,
        details.reason or details.code.name,
        details.message,
        metadata=details.metadata,
        field_violations=details.field_violations,
        retry_after=details.retry_delay,
    )
