"""The interceptor chain as one grpc.aio interceptor (issue 14).

grpc.aio runs each server interceptor as a coroutine of its own per call, and each of ours then
wrapped the handler anew: nine coroutines, a dozen closures and replaced handlers per call, for a
result that depends only on the method. :class:`FusedChain` runs the same interceptors' ``transform``
once per method, innermost first as grpc would, and hands the composed handler out from then on:
the behaviour of every call is the chain's, unchanged (the same wrappers, in the same order), and
streaming handlers get exactly what the chain gives them.

The composed handler is kept per method name only while the servicer's handler for it is the
same object, and only for methods a servicer serves (an unknown name is never remembered).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from iam_grpc.interceptors.base import Handler, UnaryInterceptor

__all__ = ["FusedChain"]


class FusedChain(grpc.aio.ServerInterceptor):
    def __init__(self, chain: Sequence[UnaryInterceptor]) -> None:
        self.chain = tuple(chain)  # outermost first
        self._composed: dict[str, tuple[Handler, Handler | None]] = {}

    def compose(self, handler: Handler | None, method: str) -> Handler | None:
        for interceptor in reversed(self.chain):
            handler = interceptor.transform(handler, method)
        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        known = self._composed.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        composed = self.compose(handler, method)
        if handler is not None:
            self._composed[method] = (handler, composed)
        return composed
