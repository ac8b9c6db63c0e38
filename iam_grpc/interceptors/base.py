"""The interceptor building blocks.

grpc.aio server interceptors only see the method name and metadata. To act
around the call, or on the decoded request, an interceptor returns a copy of
the real handler whose behaviour function is wrapped. Unary-unary handlers
and the server-streaming handlers of iam.v1 (EventService.WatchEvents) are
wrapped; a streaming behaviour is first turned into one call that writes its
messages with ``context.write`` (:func:`drive_stream`), so every interceptor's
``wrap`` surrounds the whole stream unchanged. Client-streaming handlers and
the exempt services (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import inspect
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
    "drive_stream",
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


def drive_stream(behaviour: Callable[[Any, Context], Any]) -> Behaviour:
    """A server-streaming behaviour (an async generator, or a coroutine already writing with
    ``context.write``) as one awaitable call that writes every message and returns None."""

    async def drive(request: Any, context: Context) -> None:
        produced = behaviour(request, context)
        if inspect.isasyncgen(produced):
            async for message in produced:
                await context.write(message)
            return
        await produced

    return drive


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of unary-unary and (outside the exempt services) server-streaming
    handlers; subclasses implement :meth:`wrap`."""

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

    def wrap_stream(self, behaviour: Callable[[Any, Context], Any], method: str) -> Behaviour:
        """A server-streaming behaviour wrapped like a unary one, around the whole stream."""
        return self.wrap(drive_stream(behaviour), method)

    def transform(self, handler: Handler | None, method: str) -> Handler | None:
        """The handler this interceptor hands outwards (by default: the behaviour wrapped)."""
        if handler is None or not self.applies_to(method):
            return handler
        if handler.unary_unary is not None:
            adapted: Any = self.adapt(handler)  # a namedtuple at runtime: _replace keeps the other parts
            replaced: Handler = adapted._replace(unary_unary=self.wrap(adapted.unary_unary, method))
            return replaced
        if handler.unary_stream is not None and not is_exempt(method):
            streaming: Any = self.adapt(handler)
            wrapped: Handler = streaming._replace(
                unary_stream=self.wrap_stream(streaming.unary_stream, method)
            )
            return wrapped
        return handler


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
