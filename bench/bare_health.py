"""A bare grpc.aio server with only the standard health service: the yardstick for the transport.

Usage: python bench/bare_health.py PORT [VARIANT]

One process, one event loop, the same aio HealthServicer that iam-grpc registers
(``grpc_health.v1.health.aio``), status SERVING for "" (the whole server). It prints "ready" once
listening and serves until SIGTERM or SIGINT.

VARIANT adds one piece of per-call work of the kind iam-grpc's interceptor chain does, so that
bench/chain_costs.py can price each piece on its own:

- ``plain`` (default): no interceptor;
- ``chain8``: eight pass-through interceptors built as iam_grpc.interceptors.base builds them:
  each awaits the continuation and returns a copy of the handler (``_replace``) whose behaviour is
  a new closure, on every call;
- ``fused``: one interceptor whose wrapped handler is built once per method and cached;
- ``fused+echo``: ``fused`` + the request-id echo (``send_initial_metadata`` before the answer,
  and ``set_trailing_metadata``);
- ``fused+trailer``: ``fused`` + the request-id echo in trailing metadata only (a fresh uuid4);
- ``fused+timeout``: ``fused`` + ``asyncio.timeout`` around the behaviour (a timer per call);
- ``fused+context``: ``fused`` + a ContextVar set/reset and ``logger.contextualize`` with two
  fields;
- ``fused+metrics``: ``fused`` + a labelled prometheus Counter, a Histogram and a Gauge per call;
- ``fused+accesslog``: ``fused`` + ``log.bind(6 fields).log("DEBUG", ...)`` with the sink at INFO
  (the record is dropped: what a quiet access log line costs);
- ``fused+iamlogging``: ``fused`` in a process whose logging is configured as iam-grpc's
  (``iam_grpc.logging.configure_logging`` at INFO into /dev/null), nothing logged per call;
- ``iam``: iam-grpc's own chain (``iam_grpc.server.interceptor_chain``, default settings, the
  rate-limit hook included, logging configured as the server does at INFO into /dev/null);
- ``iam-cached``: the same interceptors, but the wrapped handler is built once per method (each
  interceptor's ``transform`` runs on the first call only): what per-call handler building costs;
- ``iam-cached-noecho``: ``iam-cached`` with the request-id echo in trailing metadata only (no
  ``send_initial_metadata``, which costs a batch of its own in grpc's core);
- ``iam-cached-noecho-drop-<Class>``: that, without the interceptor of that class (e.g.
  ``AccessLogInterceptor``): what one interceptor's per-call work costs;
- ``iam-cached-noecho-keep-<Class>.<Class>...``: only the interceptors of those classes.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import sys
import time
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

VARIANTS = (
    "plain",
    "chain8",
    "fused",
    "fused+echo",
    "fused+trailer",
    "fused+timeout",
    "fused+context",
    "fused+metrics",
    "fused+accesslog",
    "fused+iamlogging",
    "iam",
    "iam-cached",
    "iam-cached-noecho",
)


class PerCallWrap(grpc.aio.ServerInterceptor):
    """As iam_grpc.interceptors.base.UnaryInterceptor: a new wrapped handler on every call."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def run(request: Any, context: Any) -> Any:
            return await inner(request, context)

        return handler._replace(unary_unary=run)


class Fused(grpc.aio.ServerInterceptor):
    """One interceptor; the wrapped handler is built once per method."""

    def __init__(self, extra: str) -> None:
        self._cache: dict[str, Any] = {}
        self._extra = extra
        self._var: contextvars.ContextVar[object] = contextvars.ContextVar("call", default=None)
        if extra == "metrics":
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

            registry = CollectorRegistry()
            self._total = Counter("rpc_total", "calls", ["method", "code"], registry=registry)
            self._seconds = Histogram("rpc_seconds", "time", ["method"], registry=registry)
            self._flight = Gauge("rpc_in_flight", "in flight", registry=registry)
        if extra == "iamlogging":
            import os

            from iam_grpc.logging import configure_logging

            configure_logging(level="INFO", stdout=open(os.devnull, "w"))  # noqa: SIM115
        if extra in ("context", "accesslog"):
            from loguru import logger

            logger.remove()
            logger.add(sys.stderr, level="INFO")
            self._log = logger.bind(logger="bench")

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = handler._replace(unary_unary=self._wrap(handler.unary_unary, method))
        self._cache[method] = wrapped
        return wrapped

    def _wrap(self, inner: Any, method: str) -> Any:
        extra = self._extra
        if extra == "echo":

            async def run(request: Any, context: Any) -> Any:
                echo = (("x-request-id", str(uuid.uuid4())),)
                await context.send_initial_metadata(echo)
                context.set_trailing_metadata(echo)
                return await inner(request, context)

        elif extra == "trailer":

            async def run(request: Any, context: Any) -> Any:
                context.set_trailing_metadata((("x-request-id", str(uuid.uuid4())),))
                return await inner(request, context)

        elif extra == "timeout":

            async def run(request: Any, context: Any) -> Any:
                async with asyncio.timeout(10.0):
                    return await inner(request, context)

        elif extra == "context":
            from loguru import logger

            async def run(request: Any, context: Any) -> Any:
                token = self._var.set(object())
                try:
                    with logger.contextualize(
                        request_id="0f8fad5b-d9cb-469f-a165-70867728950e", method=method
                    ):
                        return await inner(request, context)
                finally:
                    self._var.reset(token)

        elif extra == "metrics":

            async def run(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                self._flight.inc()
                try:
                    return await inner(request, context)
                finally:
                    self._flight.dec()
                    self._total.labels(method, "OK").inc()
                    self._seconds.labels(method).observe(time.perf_counter() - started)

        elif extra == "accesslog":

            async def run(request: Any, context: Any) -> Any:
                try:
                    return await inner(request, context)
                finally:
                    self._log.bind(
                        grpc_status="OK", reason=None, duration_ms=0.1, caller=None, peer="x", user_id=None
                    ).log("DEBUG", "rpc finished")

        else:

            async def run(request: Any, context: Any) -> Any:
                return await inner(request, context)

        return run


class Cached(grpc.aio.ServerInterceptor):
    """Runs a chain's ``transform`` steps once per method and serves the result from then on."""

    def __init__(self, chain: list[Any]) -> None:
        self._chain = chain
        self._cache: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        cached = self._cache.get(method)
        if cached is None:
            cached = await continuation(details)
            for interceptor in reversed(self._chain):  # innermost first, as grpc nests them
                cached = interceptor.transform(cached, method)
            self._cache[method] = cached
        return cached


def iam_chain(echo: bool, drop: str = "", keep: str = "") -> list[Any]:
    import os
    import tempfile

    from iam_grpc.config import load_settings
    from iam_grpc.interceptors.context import RequestContextInterceptor
    from iam_grpc.interceptors.ratelimit import RateLimitInterceptor
    from iam_grpc.logging import configure_logging
    from iam_grpc.metrics import Metrics
    from iam_grpc.server import interceptor_chain

    settings = load_settings(environ={"IAM_DATA_DIR": tempfile.mkdtemp(), "IAM_LOGGING__FILES": "false"})
    configure_logging(level="INFO", stdout=open(os.devnull, "w"))  # noqa: SIM115 - for the process's life
    hooks: list[Any] = [RateLimitInterceptor(None)]  # type: ignore[arg-type]  # health is exempt: never called
    chain = interceptor_chain(settings, Metrics(), hooks)
    if not echo:
        chain[0] = _trailing_echo_only()(settings.server.default_deadline)
    assert isinstance(chain[0], RequestContextInterceptor)
    kept = set(keep.split(".")) if keep else None

    def wanted(interceptor: Any) -> bool:
        names = {c.__name__ for c in type(interceptor).__mro__}
        return drop not in names and (kept is None or bool(kept & names))

    return [i for i in chain if wanted(i)]


def _trailing_echo_only() -> type:
    from loguru import logger

    from iam_grpc.core.call import CallInfo, reset_current, set_current
    from iam_grpc.ids import REQUEST_ID
    from iam_grpc.interceptors.context import (
        REQUEST_ID_KEY,
        RequestContextInterceptor,
        _metadata_value,
        parse_peer,
    )

    class TrailingEchoOnly(RequestContextInterceptor):
        """iam_grpc.interceptors.context's wrapper with the echo in trailing metadata only."""

        def wrap(self, behaviour: Any, method: str) -> Any:
            default = self._default

            async def run(request: Any, context: Any) -> Any:
                offered = _metadata_value(context, REQUEST_ID_KEY)
                request_id = offered if offered and REQUEST_ID.match(offered) else str(uuid.uuid4())
                peer = context.peer() or ""
                remaining = context.time_remaining()
                call = CallInfo(
                    method=method,
                    request_id=request_id,
                    peer=peer,
                    peer_ip=parse_peer(peer),
                    deadline=time.monotonic() + (default if remaining is None else remaining),
                )
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                token = set_current(call)
                try:
                    with logger.contextualize(request_id=request_id, method=method):
                        return await behaviour(request, context)
                finally:
                    reset_current(token)

            return run

    return TrailingEchoOnly


def interceptors(variant: str) -> list[grpc.aio.ServerInterceptor]:
    if variant == "plain":
        return []
    if variant == "iam":
        return iam_chain(echo=True)
    if variant.startswith("iam-cached"):
        drop = variant.split("-drop-", 1)[1] if "-drop-" in variant else ""
        keep = variant.split("-keep-", 1)[1] if "-keep-" in variant else ""
        return [Cached(iam_chain(echo="noecho" not in variant, drop=drop, keep=keep))]
    if variant == "chain8":
        return [PerCallWrap() for _ in range(8)]
    return [Fused(variant.split("+", 1)[1] if "+" in variant else "")]


async def main(port: int, variant: str) -> None:
    server = grpc.aio.server(interceptors=interceptors(variant))
    health = health_aio.HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    chosen = sys.argv[2] if len(sys.argv) > 2 else "plain"
    if chosen not in VARIANTS and not chosen.startswith(
        ("iam-cached-noecho-drop-", "iam-cached-noecho-keep-")
    ):
        raise SystemExit(f"variant must be one of {', '.join(VARIANTS)}")
    asyncio.run(main(int(sys.argv[1]), chosen))
