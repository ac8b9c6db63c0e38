"""Error mapping: the one place where an :class:`~iam_grpc.errors.IamError`
becomes a gRPC status with ``google.rpc.Status`` details (``ErrorInfo`` always;
``BadRequest`` and ``RetryInfo`` where they apply). ``NotImplementedError``,
raised by a generated servicer base for an RPC of the protos that no servicer
overrides yet, answers UNIMPLEMENTED like :class:`NotImplementedYet`. Anything
else is a bug: logged with its traceback, answered INTERNAL with the request id
only."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from iam_grpc.core.call import current_call
from iam_grpc.errors import (
    DOMAIN,
    DeadlineExceeded,
    ErrorCode,
    IamError,
    InternalError,
    InvalidArgument,
    NotImplementedYet,
    RateLimited,
    ServerError,
)
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor
from iam_grpc.logging import component_logger

__all__ = ["GRPC_CODES", "ErrorMappingInterceptor", "grpc_code", "to_status"]

log = component_logger("iam.errors")

GRPC_CODES: Mapping[ErrorCode, grpc.StatusCode] = MappingProxyType(
    {code: grpc.StatusCode[code.name] for code in ErrorCode}
)
"""Each transport-neutral code answers as the gRPC status code of the same name."""


def grpc_code(error: IamError) -> grpc.StatusCode:
    return GRPC_CODES[error.code]


def to_status(error: IamError, request_id: str | None = None) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error (shared with tests and the client library)."""
    message = error.message
    if isinstance(error, InternalError) and request_id:
        message = f"Internal error (request id {request_id})."
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    details = [info]
    if isinstance(error, InvalidArgument) and error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(error.retry_after)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=grpc_code(error).value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


class ErrorMappingInterceptor(UnaryInterceptor):
    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            try:
                return await behaviour(request, context)
            except IamError as error:
                if isinstance(error, DeadlineExceeded):
                    # the caller's deadline left too little time: worth counting, not an alarm
                    log.bind(reason=error.reason).info("deadline too close to do the work")
                elif isinstance(error, ServerError):
                    log.bind(reason=error.reason, **error.cause()).warning("request failed on our side")
                await _abort(context, error)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except NotImplementedError:
                # the contract declares the RPC before its behaviour lands: not a bug of ours
                await _abort(context, NotImplementedYet())
            except Exception:
                log.exception("unexpected error")
                await _abort(context, InternalError())
            raise AssertionError("unreachable: abort raises")

        return run


async def _abort(context: Context, error: IamError) -> None:
    call = current_call()
    request_id = call.request_id if call else None
    if call is not None:
        call.code = grpc_code(error).name
        call.reason = error.reason
    status = rpc_status.to_status(to_status(error, request_id))
    trailing = tuple(status.trailing_metadata)
    if request_id:
        trailing += (("x-request-id", request_id),)
    await context.abort(status.code, status.details, trailing_metadata=trailing)
