"""The interceptor chain around a probe service: deadlines, unexpected errors,
request hooks and access records, each shown through a real grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from loguru import logger

from iam_grpc.core.call import CallInfo, current_call, remaining
from iam_grpc.errors import FieldViolation, InvalidArgument, RateLimited
from iam_grpc.interceptors.base import RequestInterceptor
from iam_grpc.metrics import Metrics
from iam_grpc.proto import auth_pb2
from iam_grpc.server import interceptor_chain
from iam_grpc.testing import error_details, service_settings

PROBE = "iam.test.Probe"


class RejectEmptyEmail(RequestInterceptor):
    """A request hook like the validators and limiters that will use this seam."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def before(self, method: str, request: Message, call: CallInfo) -> None:
        assert isinstance(request, auth_pb2.LoginRequest)
        self.seen.append((method, request.email))
        if request.email == "limited@example.com":
            raise RateLimited(timedelta(seconds=2.2), "ip")
        if not request.email:
            raise InvalidArgument([FieldViolation("email", "required")])


async def slow(request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
    await asyncio.sleep(5)
    return auth_pb2.LoginResponse()


async def broken(request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
    raise KeyError("/secret/path SELECT * FROM users")


async def declared(request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
    # what a generated servicer base does for an RPC its subclass does not override
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


async def budget(request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
    left = remaining()
    call = current_call()
    assert call is not None
    return auth_pb2.LoginResponse(password_breached=left is not None and 0 < left <= 0.6)


async def echo(request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
    return auth_pb2.LoginResponse(password_breached=bool(request.email))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def probe(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[grpc.aio.Channel, RejectEmptyEmail]]:
    settings = service_settings(tmp_path_factory.mktemp("probe"), {"IAM_SERVER__DEFAULT_DEADLINE": "500ms"})
    hook = RejectEmptyEmail()
    server = grpc.aio.server(interceptors=interceptor_chain(settings, Metrics(), [hook]))
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=auth_pb2.LoginRequest.FromString,
            response_serializer=auth_pb2.LoginResponse.SerializeToString,
        )
        for name, fn in (
            ("Slow", slow),
            ("Broken", broken),
            ("Declared", declared),
            ("Budget", budget),
            ("Echo", echo),
        )
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PROBE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, hook
    await server.stop(0)


def rpc(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{PROBE}/{name}",
        request_serializer=auth_pb2.LoginRequest.SerializeToString,
        response_deserializer=auth_pb2.LoginResponse.FromString,
    )


async def test_calls_without_a_deadline_get_the_default_one(probe: tuple[grpc.aio.Channel, Any]) -> None:
    """With no client deadline, server.default_deadline ends the call with DEADLINE_EXCEEDED."""
    channel, _ = probe
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc(channel, "Slow")(auth_pb2.LoginRequest(email="a@example.com"))
    elapsed = asyncio.get_running_loop().time() - started
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    assert 0.45 < elapsed < 3.0  # ended by the 500 ms default, not by the 5 s sleep


async def test_a_client_deadline_is_honoured(probe: tuple[grpc.aio.Channel, Any]) -> None:
    """A shorter client deadline ends the call at that deadline."""
    channel, _ = probe
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc(channel, "Slow")(auth_pb2.LoginRequest(email="a@example.com"), timeout=0.15)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert asyncio.get_running_loop().time() - started < 1.5  # far below the 5 s the method would take


async def test_core_code_can_read_the_remaining_budget(probe: tuple[grpc.aio.Channel, Any]) -> None:
    """remaining() inside a call reports the seconds left before the effective deadline."""
    channel, _ = probe
    answer = await rpc(channel, "Budget")(auth_pb2.LoginRequest(email="a@example.com"))
    assert answer.password_breached


async def test_unexpected_exceptions_become_internal_with_the_request_id_only(
    probe: tuple[grpc.aio.Channel, Any],
) -> None:
    """A bug answers INTERNAL naming only the request id; the traceback goes to the log under that id."""
    channel, _ = probe
    records: list[str] = []
    sink = logger.add(
        lambda message: records.append(str(message)), level="ERROR", format="{message} {extra}\n{exception}"
    )
    try:
        call = rpc(channel, "Broken")(
            auth_pb2.LoginRequest(email="a@example.com"), metadata=(("x-request-id", "probe-req-0001"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    finally:
        logger.remove(sink)
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert details.message == "Internal error (request id probe-req-0001)."
    assert "SELECT" not in details.message
    logged = "".join(records)
    assert "probe-req-0001" in logged
    assert "KeyError" in logged


async def test_a_declared_but_unimplemented_rpc_answers_unimplemented_not_internal(
    probe: tuple[grpc.aio.Channel, Any],
) -> None:
    """An RPC the protos declare before its servicer lands (the generated base raises
    NotImplementedError) answers UNIMPLEMENTED with ErrorInfo reason UNIMPLEMENTED, logged as no error."""
    channel, _ = probe
    records: list[str] = []
    sink = logger.add(lambda message: records.append(str(message)), level="ERROR", format="{message}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rpc(channel, "Declared")(auth_pb2.LoginRequest(email="a@example.com"))
    finally:
        logger.remove(sink)
    details = error_details(caught.value)
    assert (details.code, details.reason, details.domain) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "UNIMPLEMENTED",
        "iam.v1",
    )
    assert records == []


async def test_request_hooks_see_the_decoded_request_and_can_refuse(
    probe: tuple[grpc.aio.Channel, RejectEmptyEmail],
) -> None:
    """A RequestInterceptor gets the decoded message; its IamError is mapped with details."""
    channel, hook = probe
    assert (await rpc(channel, "Echo")(auth_pb2.LoginRequest(email="x@example.com"))).password_breached
    assert hook.seen[-1] == (f"/{PROBE}/Echo", "x@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await rpc(channel, "Echo")(auth_pb2.LoginRequest())
    assert error_details(invalid.value).field_violations == {"email": "required"}
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await rpc(channel, "Echo")(auth_pb2.LoginRequest(email="limited@example.com"))
    details = error_details(limited.value)
    assert (details.code, details.reason, details.metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"scope": "ip"},
    )
    assert details.retry_delay == timedelta(seconds=3)


async def test_malformed_payloads_never_reach_request_hooks(
    probe: tuple[grpc.aio.Channel, RejectEmptyEmail],
) -> None:
    """The decode guard answers INVALID_ARGUMENT before any hook runs."""
    channel, hook = probe
    seen = len(hook.seen)
    raw = channel.unary_unary(f"/{PROBE}/Echo")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\xff\xff\xff")
    assert error_details(caught.value).reason == "INVALID_ARGUMENT"
    assert len(hook.seen) == seen
