"""The interceptor building blocks.

grpc.aio server interceptors only see the method name and metadata. To act
around the call, or on the decoded request, an interceptor returns a copy of
the real handler whose behaviour function is wrapped. Only unary-unary
handlers are wrapped (every iam.v1 RPC is unary); streaming handlers (health
Watch, reflection) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from iam_grpc.core.call import CallInfo, current_call

__all__ = [
    "EXEMPT_PREFIXES",
    "Behaviour",
    "Context",
    "Handler",
    "RequestInterceptor",
    "UnaryInterceptor",
    "is_exempt",
]

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
Behaviour = Callable[[Any, Context], Awaitable[Any]]

# Health checks and reflection are open to everybody and are not end-user RPCs.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_exempt(method: str) -> bool:
    return method.startswith(EXEMPT_PREFIXES)


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of unary-unary handlers; subclasses implement :meth:`wrap`."""

    def applies_to(self, method: str) -> bool:
        return True

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        raise NotImplementedError

    def adapt(self, handler: Any) -> Any:
        """A chance to change other parts of the handler (e.g. the deserializer)."""
        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return self.transform(handler, handler_call_details.method)

    def transform(self, handler: Handler | None, method: str) -> Handler | None:
        """The handler this interceptor hands outwards (by default: the behaviour wrapped)."""
        if handler is None or handler.unary_unary is None or not self.applies_to(method):
            return handler
        adapted: Any = self.adapt(handler)  # a namedtuple at runtime: _replace keeps the other parts
        replaced: Handler = adapted._replace(unary_unary=self.wrap(adapted.unary_unary, method))
        return replaced


class RequestInterceptor(UnaryInterceptor):
    """Runs :meth:`before` with the decoded request, before the servicer.

    The hook rate limiting and validation build on: raise an
    :class:`~iam_grpc.errors.IamError` to refuse the call.
    """

    def applies_to(self, method: str) -> bool:
        return not is_exempt(method)

    async def before(self, method: str, request: Message, call: CallInfo) -> None:
        raise NotImplementedError

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            call = current_call()
            if call is not None:
                await self.before(method, request, call)
            return await behaviour(request, context)

        return run
