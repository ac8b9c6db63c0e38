"""A grpc.aio server interceptor that guards a service with access tokens.

    guard = TokenGuard(iam_client)
    server = grpc.aio.server(interceptors=[GuardInterceptor(guard, {
        "/shop.v1.Orders/CreateOrder": ["user"],
        "/shop.v1.Orders/RefundOrder": ["support"],
    }, public={"/grpc.health.v1.Health/Check"})])

Callers send ``authorization: Bearer <access token>``. Methods not listed and
not public are refused (deny by default). Inside a handler,
``current_principal()`` answers who is calling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

from iam_grpc_client._errors import IamCallError
from iam_grpc_client._guard import Principal, TokenGuard

__all__ = ["GuardInterceptor", "current_principal"]

_PRINCIPAL: ContextVar[Principal | None] = ContextVar("iam_principal", default=None)


def current_principal() -> Principal:
    """The verified caller of the current RPC (inside a guarded handler)."""
    principal = _PRINCIPAL.get()
    if principal is None:
        raise LookupError("no verified principal: the method is public or not guarded")
    return principal


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, guard: TokenGuard, roles: Mapping[str, Sequence[str]], *, public: Iterable[str] = ()
    ) -> None:
        self._guard = guard
        self._roles = {method: tuple(required) for method, required in roles.items()}
        self._public = frozenset(public)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in self._public:
            return handler
        required = self._roles.get(method)
        if required is None or handler.unary_unary is None:
            return _refusing(handler)  # deny by default (and streaming methods are not guarded here)
        behaviour = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = ""
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
                    token = value[7:].strip()
            try:
                principal = await self._guard.verify(token, required)
            except IamCallError as error:
                await context.abort(error.code, error.reason)
            reset = _PRINCIPAL.set(principal)
            try:
                return await behaviour(request, context)
            finally:
                _PRINCIPAL.reset(reset)

        return handler._replace(unary_unary=guarded)


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


def _refusing(handler: Any) -> Any:
    return handler._replace(
        unary_unary=_deny if handler.unary_unary else None,
        unary_stream=_deny if handler.unary_stream else None,
        stream_unary=_deny if handler.stream_unary else None,
        stream_stream=_deny if handler.stream_stream else None,
    )
