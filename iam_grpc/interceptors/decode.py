"""Malformed payloads: a request that does not decode answers INVALID_ARGUMENT
instead of gRPC's generic failure, and never reaches a servicer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from iam_grpc.errors import FieldViolation, InvalidArgument
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor

__all__ = ["DecodeGuardInterceptor"]


class _Malformed:
    """Stands in for a request whose bytes did not decode."""

    __slots__ = ()


MALFORMED = _Malformed()


class DecodeGuardInterceptor(UnaryInterceptor):
    def adapt(self, handler: Any) -> Any:
        deserialize: Callable[[bytes], Any] | None = handler.request_deserializer
        if deserialize is None:
            return handler

        def safe(raw: bytes) -> Any:
            try:
                return deserialize(raw)
            except (DecodeError, ValueError, TypeError, UnicodeDecodeError, RuntimeError):
                return MALFORMED

        return handler._replace(request_deserializer=safe)

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            if request is MALFORMED:
                raise InvalidArgument([FieldViolation("request", "the request message does not decode")])
            return await behaviour(request, context)

        return run
