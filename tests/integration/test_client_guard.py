"""The Python client distribution (iam_grpc_client) against a real iam-grpc: calls, errors, and a
sample service it protects."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio

from iam_grpc.testing import RunningService, running_service
from iam_grpc_client import (
    GuardInterceptor,
    IamCallError,
    IamClient,
    TokenGuard,
    current_principal,
    error_details,
)
from iam_grpc_client.proto import auth_pb2, common_pb2, token_pb2, token_pb2_grpc
from tests.conftest import Backend
from tests.sessions_helper import new_session, new_user

SHOP_KEY = "iamk_shop_" + "d" * 43


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    callers = {  # a service with an API key, as docs/clients.md's examples send one
        "IAM_CALLERS__SHOP__API_KEY_SHA256": json.dumps([hashlib.sha256(SHOP_KEY.encode()).hexdigest()]),
        "IAM_CALLERS__SHOP__METHODS": '["iam.v1.AuthService/*", "iam.v1.TokenService/*"]',
    }
    async with running_service(tmp_path_factory.mktemp("guard"), backend.isolated() | callers) as running:
        yield running


async def test_the_guard_verifies_tokens_locally(iam: RunningService) -> None:
    """A fresh token verifies offline against the JWKS; roles are enforced; forgeries fail."""
    async with IamClient(iam.address) as client:
        guard = TokenGuard(client)
        user, session = await new_session(iam.app, await new_user(iam.app, roles=("support",)))
        principal = await guard.verify(session.access_token, ["support"])
        assert (principal.user_id, principal.session_id, principal.roles) == (
            user.id,
            session.session_id,
            ("support", "user"),
        )
        with pytest.raises(IamCallError) as missing:
            await guard.verify(session.access_token, ["admin"])
        assert (missing.value.reason, missing.value.metadata) == ("ROLE_REQUIRED", {"missing": "admin"})
        head, body, _ = session.access_token.split(".")
        for bad in (f"{head}.{body}.AAAA", "not-a-token", session.refresh_token):
            with pytest.raises(IamCallError) as invalid:
                await guard.verify(bad)
            assert invalid.value.reason == "TOKEN_INVALID"


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(iam: RunningService) -> None:
    """A new key is learned by refetching; a flood of unknown kids does not hammer the service."""
    async with IamClient(iam.address) as client:
        guard = TokenGuard(client, refetch_interval=timedelta(seconds=60))
        _, session = await new_session(iam.app)
        await guard.verify(session.access_token)
        assert guard.fetches == 1
        key = iam.app.components.keys.signing_key()
        assert key is not None
        claims = jwt.decode(session.access_token, options={"verify_signature": False})
        for _ in range(20):
            forged = jwt.encode(
                claims, key.private, algorithm="ES256", headers={"kid": "unknown-kid", "typ": "at+jwt"}
            )
            with pytest.raises(IamCallError):
                await guard.verify(forged)
        assert guard.fetches <= 2


async def test_expired_tokens_are_reported_as_expired(iam: RunningService) -> None:
    """An expired but genuine token is TOKEN_EXPIRED."""
    async with IamClient(iam.address) as client:
        guard = TokenGuard(client, leeway=timedelta(0))
        _, session = await new_session(iam.app)
        key = iam.app.components.keys.signing_key()
        assert key is not None
        claims = {
            **jwt.decode(session.access_token, options={"verify_signature": False}),
            "exp": int(time.time()) - 5,
        }
        expired = jwt.encode(
            claims, key.private, algorithm="ES256", headers={"kid": key.row.kid, "typ": "at+jwt"}
        )
        with pytest.raises(IamCallError) as caught:
            await guard.verify(expired)
        assert caught.value.reason == "TOKEN_EXPIRED"


async def test_cached_tokens_still_lose_their_key_and_their_time(iam: RunningService) -> None:
    """A token verified before is answered from the cache only while its key is published and
    its expiry holds."""
    async with IamClient(iam.address) as client:
        published = await client.get_jwks()
        document = {"keys": list(json.loads(published)["keys"])}

        async def jwks() -> str:
            return json.dumps(document)

        guard = TokenGuard(jwks, max_age=timedelta(0), refetch_interval=timedelta(0), leeway=timedelta(0))
        _, session = await new_session(iam.app)
        assert (await guard.verify(session.access_token)).session_id == session.session_id
        assert (await guard.verify(session.access_token)).session_id == session.session_id
        document["keys"] = []  # the key is withdrawn from the JWKS
        with pytest.raises(IamCallError) as withdrawn:
            await guard.verify(session.access_token)
        assert withdrawn.value.reason == "TOKEN_INVALID"

        document["keys"] = list(json.loads(published)["keys"])
        key = iam.app.components.keys.signing_key()
        assert key is not None
        claims = {
            **jwt.decode(session.access_token, options={"verify_signature": False}),
            "exp": int(time.time()) + 1,
        }
        short = jwt.encode(
            claims, key.private, algorithm="ES256", headers={"kid": key.row.kid, "typ": "at+jwt"}
        )
        await guard.verify(short)  # cached now
        await asyncio.sleep(2.1)
        with pytest.raises(IamCallError) as expired:
            await guard.verify(short)
        assert expired.value.reason == "TOKEN_EXPIRED"


async def test_revocation_checks_catch_logged_out_sessions(iam: RunningService) -> None:
    """Locally a revoked token still looks fine; with revocation=client the guard asks the service."""
    async with IamClient(iam.address) as client:
        _, session = await new_session(iam.app)
        await client.logout(common_pb2.ClientContext(ip="198.51.100.77"), session.refresh_token)
        assert (await TokenGuard(client).verify(session.access_token)).session_id == session.session_id
        with pytest.raises(IamCallError) as revoked:
            await TokenGuard(client, revocation=client).verify(session.access_token)
        assert revoked.value.reason == "SESSION_REVOKED"


@pytest_asyncio.fixture(loop_scope="session")
async def shop(iam: RunningService) -> AsyncIterator[str]:
    """A sample resource service protected by GuardInterceptor (the docs/clients.md example)."""
    client = IamClient(iam.address)
    guard = TokenGuard(client)

    async def create_order(request: Any, context: Any) -> auth_pb2.LoginResponse:
        return auth_pb2.LoginResponse(session=common_pb2.Session(user_id=current_principal().user_id))

    async def ping(request: Any, context: Any) -> auth_pb2.LoginResponse:
        try:
            current_principal()
        except LookupError:
            return auth_pb2.LoginResponse(session=common_pb2.Session(user_id="anonymous"))
        raise AssertionError("a public method saw a principal")

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            create_order,
            request_deserializer=auth_pb2.LoginRequest.FromString,
            response_serializer=auth_pb2.LoginResponse.SerializeToString,
        )
        for name in ("CreateOrder", "RefundOrder", "Secret")
    }
    handlers["Ping"] = grpc.unary_unary_rpc_method_handler(
        ping,
        request_deserializer=auth_pb2.LoginRequest.FromString,
        response_serializer=auth_pb2.LoginResponse.SerializeToString,
    )
    server = grpc.aio.server(
        interceptors=[
            GuardInterceptor(
                guard,
                {"/shop.v1.Orders/CreateOrder": ["user"], "/shop.v1.Orders/RefundOrder": ["support"]},
                public={"/shop.v1.Orders/Ping"},
            )
        ]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("shop.v1.Orders", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)
    await client.close()


async def shop_call(address: str, method: str, token: str | None) -> tuple[grpc.StatusCode, str]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/shop.v1.Orders/{method}",
            request_serializer=auth_pb2.LoginRequest.SerializeToString,
            response_deserializer=auth_pb2.LoginResponse.FromString,
        )
        try:
            answer = await call(auth_pb2.LoginRequest(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, answer.session.user_id


async def test_the_interceptor_guards_methods_by_role(iam: RunningService, shop: str) -> None:
    """Listed methods need a valid token and their roles, public ones nothing, unlisted ones are refused."""
    user, session = await new_session(iam.app)
    assert await shop_call(shop, "CreateOrder", session.access_token) == (grpc.StatusCode.OK, user.id)
    assert await shop_call(shop, "CreateOrder", None) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert await shop_call(shop, "RefundOrder", session.access_token) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_REQUIRED",
    )
    assert await shop_call(shop, "Secret", session.access_token) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "METHOD_NOT_ALLOWED",
    )
    assert await shop_call(shop, "Ping", None) == (grpc.StatusCode.OK, "anonymous")


@pytest.mark.parametrize("document", ["", "[]", '{"keys": 1}', '{"keys": [{"kty": "nonsense"}]}'])
async def test_a_malformed_key_set_is_an_outage_not_a_crash(document: str) -> None:
    async def jwks() -> str:
        return document

    header = base64.urlsafe_b64encode(b'{"alg":"ES256","typ":"at+jwt","kid":"k1"}').rstrip(b"=").decode()
    with pytest.raises(IamCallError) as caught:
        await TokenGuard(jwks).verify(f"{header}.e30.AAAA")
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")


async def test_refused_calls_raise_the_services_reason_and_violations(iam: RunningService) -> None:
    """IamClient turns a refusal into IamCallError: code, ErrorInfo reason, BadRequest violations."""
    async with IamClient(iam.address) as client:
        with pytest.raises(IamCallError) as invalid:
            await client.verify_access_token("not-a-token")
        assert (invalid.value.code, invalid.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )
        with pytest.raises(IamCallError) as malformed:
            await client.call(
                client.auth.Login, auth_pb2.LoginRequest(client=common_pb2.ClientContext(ip="198.51.100.7"))
            )
        assert (malformed.value.code, malformed.value.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert malformed.value.field_violations == {"email": "is required", "password": "is required"}


async def test_error_details_decode_a_plain_stubs_failure(iam: RunningService) -> None:
    """The docs' plain-stub example: error_details reads the google.rpc.Status trailer."""
    async with grpc.aio.insecure_channel(iam.address) as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token="é.\u2028."), timeout=5
            )
    details = error_details(caught.value)
    assert (details.code, details.reason, details.domain) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
        "iam.v1",
    )
    assert details.raw_status


def _docs_python_examples() -> list[str]:
    """The code blocks of docs/clients.md's Python section that use the client."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "clients.md").read_text()
    section = text[text.index("## Python\n") : text.index("For tests, run the real service")]
    return [
        block
        for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL)
        if "iam_grpc_client" in block
    ]


async def test_the_docs_python_examples_work_as_printed(iam: RunningService) -> None:
    """docs/clients.md's IamClient and plain-stub examples, run against a real server."""

    class Unauthorized(Exception):
        pass

    with_client, with_stub = _docs_python_examples()
    ours: dict[str, Any] = {"API_KEY": SHOP_KEY, "request_id": "docs-example-1", "Unauthorized": Unauthorized}
    exec(with_client.replace('"iam:50051"', repr(iam.address)), ours)  # noqa: S102
    user, session = await new_session(iam.app)
    assert await ours["verify"](session.access_token) == user.id
    with pytest.raises(Unauthorized, match="TOKEN_INVALID"):
        await ours["verify"]("not-a-token")
    with pytest.raises(IamCallError) as refused:
        await ours["login"]("198.51.100.9", "docs", "", "nobody@example.com", "a wrong password")
    assert refused.value.reason == "INVALID_CREDENTIALS"
    await ours["iam"].close()

    plain: dict[str, Any] = {
        "API_KEY": SHOP_KEY,
        "request_id": "docs-example-2",
        "Unauthorized": Unauthorized,
    }
    exec(with_stub, plain)  # noqa: S102
    async with grpc.aio.insecure_channel(iam.address) as channel:
        assert await plain["verify"](channel, session.access_token) == user.id
        with pytest.raises(Unauthorized, match="TOKEN_INVALID"):
            await plain["verify"](channel, "é.\u2028.")
