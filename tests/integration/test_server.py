"""The real server on a free port, on both backends: health, reflection,
request ids, error details, payload limits, ops HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from iam_grpc.proto import (
    api_token_pb2,
    api_token_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    event_pb2,
    event_pb2_grpc,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from iam_grpc.server import SERVICE_NAMES
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.contract_helper import SERVICE_MODULES, is_pending


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("server"), backend.isolated()) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with service.channel() as opened:
        yield opened


def every_rpc() -> list[tuple[str, object, object]]:
    """(full method, stub factory, empty request) for every iam.v1 RPC."""
    rpcs = []
    for module, stub, file in (
        (auth_pb2, auth_pb2_grpc.AuthServiceStub, auth_pb2.DESCRIPTOR),
        (token_pb2, token_pb2_grpc.TokenServiceStub, token_pb2.DESCRIPTOR),
        (mfa_pb2, mfa_pb2_grpc.MfaServiceStub, mfa_pb2.DESCRIPTOR),
        (user_pb2, user_pb2_grpc.UserServiceStub, user_pb2.DESCRIPTOR),
        (api_token_pb2, api_token_pb2_grpc.ApiTokenServiceStub, api_token_pb2.DESCRIPTOR),
        (event_pb2, event_pb2_grpc.EventServiceStub, event_pb2.DESCRIPTOR),
    ):
        for service in file.services_by_name.values():
            for method in service.methods:
                request_cls = getattr(module, method.input_type.name)
                rpcs.append((f"{service.full_name}/{method.name}", stub, request_cls()))
    return rpcs


async def test_health_is_serving_for_the_server_and_each_service(channel: grpc.aio.Channel) -> None:
    """Once started, health answers SERVING overall and per service."""
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_the_contract_services(channel: grpc.aio.Channel) -> None:
    """Reflection (on in embedded mode) lists the three iam.v1 services and health."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {
        "iam.v1.AuthService",
        "iam.v1.TokenService",
        "iam.v1.MfaService",
        "grpc.health.v1.Health",
    } <= names


async def test_reflection_serves_the_descriptors_with_comments(channel: grpc.aio.Channel) -> None:
    """A client can fetch the auth.proto descriptor by symbol."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="iam.v1.AuthService")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[0].file_descriptor_response.file_descriptor_proto
    ]
    assert "iam/v1/auth.proto" in {f.name for f in files}


def test_the_contract_names_every_rpc_of_api_md() -> None:
    """The protos declare exactly the RPCs api.md names (and keeps field numbers)."""
    assert {module.DESCRIPTOR.name for module in SERVICE_MODULES} == {
        f"iam/v1/{name}.proto" for name in ("auth", "token", "mfa", "user", "api_token", "event")
    }
    names = {rpc[0] for rpc in every_rpc()}
    assert names == {
        "iam.v1.AuthService/" + m
        for m in (
            "Signup",
            "Login",
            "Logout",
            "RequestPasswordReset",
            "ResetPassword",
            "ChangePassword",
            "RequestEmailChange",
            "ConfirmEmailChange",
        )
    } | {
        "iam.v1.TokenService/" + m
        for m in (
            "Refresh",
            "VerifyAccessToken",
            "RevokeSession",
            "RevokeAllSessions",
            "ListSessions",
            "GetJwks",
        )
    } | {
        "iam.v1.MfaService/" + m
        for m in (
            "VerifyChallenge",
            "RedeemMagicLink",
            "InspectMagicLink",
            "ResendChallenge",
            "StartStepUp",
            "ConsumeStepUpGrant",
        )
    } | {
        "iam.v1.AuthService/" + m
        for m in ("SignInWithIdToken", "LinkIdentity", "UnlinkIdentity", "RequestEmailVerification")
    } | {
        "iam.v1.MfaService/" + m
        for m in (
            "EnrollTotp",
            "ConfirmTotp",
            "DisableTotp",
            "StartPasskeyRegistration",
            "FinishPasskeyRegistration",
            "ListPasskeys",
            "DeletePasskey",
            "StartPasskeyLogin",
            "FinishPasskeyLogin",
        )
    } | {
        "iam.v1.UserService/" + m
        for m in (
            "GetMe",
            "UpdateProfile",
            "GetUser",
            "ListUsers",
            "DisableUser",
            "EnableUser",
            "GrantRole",
            "RevokeRole",
            "DeleteUser",
            "DeleteMyAccount",
            "ExportUser",
            "ListAuditEvents",
        )
    } | {
        "iam.v1.ApiTokenService/" + m
        for m in ("CreateApiToken", "ListApiTokens", "RevokeApiToken", "RotateApiToken", "VerifyApiToken")
    } | {"iam.v1.EventService/WatchEvents"}
    assert auth_pb2.LoginResponse.DESCRIPTOR.fields_by_name["password_breached"].number == 3
    assert common_pb2.Session.DESCRIPTOR.fields_by_name["device_id"].number == 7
    mfa = mfa_pb2.DESCRIPTOR.services_by_name["MfaService"]
    assert mfa.methods_by_name["ResendChallenge"].output_type.full_name == "iam.v1.MfaChallenge"
    assert mfa.methods_by_name["StartStepUp"].output_type.full_name == "iam.v1.MfaChallenge"


def _numbers(message: object) -> dict[str, int]:
    return {field.name: field.number for field in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_the_second_round_messages_keep_their_field_numbers() -> None:
    """Field numbers of the second-round contract (api.md's order, `client = 1` first in end-user
    requests, none in admin requests), the shared messages' new fields, and the sign-in results
    that share LoginResponse's numbers."""
    assert _numbers(common_pb2.MfaChallenge) == {
        "challenge_id": 1,
        "reason": 2,
        "expires_at": 3,
        "channel": 4,
        "channels": 5,
        "passkey_options_json": 6,
    }
    assert _numbers(common_pb2.Identity) == {"provider": 1, "subject": 2, "email": 3, "linked_at": 4}
    assert _numbers(mfa_pb2.VerifyChallengeRequest) == {
        "client": 1,
        "challenge_id": 2,
        "code": 3,
        "recovery_code": 4,
        "passkey_assertion_json": 5,
    }
    assert _numbers(user_pb2.User) == {
        "user_id": 1,
        "email": 2,
        "email_verified": 3,
        "name": 4,
        "last_name": 5,
        "locale": 6,
        "roles": 7,
        "status": 8,
        "created_at": 9,
        "last_login_at": 10,
        "mfa_methods": 11,
        "identities": 12,
    }
    assert dict(user_pb2.UserStatus.items()) == {
        "USER_STATUS_UNSPECIFIED": 0,
        "USER_STATUS_ACTIVE": 1,
        "USER_STATUS_DISABLED": 2,
    }
    assert _numbers(user_pb2.UpdateProfileRequest) == {
        "client": 1,
        "access_token": 2,
        "name": 3,
        "last_name": 4,
        "locale": 5,
        "update_mask": 6,
    }
    assert _numbers(user_pb2.GetUserRequest) == {"user_id": 1, "email": 2}
    assert [f.name for f in user_pb2.GetUserRequest.DESCRIPTOR.oneofs_by_name["key"].fields] == [
        "user_id",
        "email",
    ]
    assert _numbers(user_pb2.ListUsersRequest) == {
        "page_size": 1,
        "page_token": 2,
        "email_prefix": 3,
        "role": 4,
        "status": 5,
    }
    assert _numbers(user_pb2.RevokeRoleRequest) == {"user_id": 1, "role": 2, "end_sessions": 3}
    assert _numbers(user_pb2.DeleteMyAccountRequest) == {"client": 1, "access_token": 2, "step_up_grant": 3}
    assert _numbers(user_pb2.ListAuditEventsRequest) == {
        "user_id": 1,
        "kinds": 2,
        "since": 3,
        "page_size": 4,
        "page_token": 5,
    }
    assert _numbers(user_pb2.AuditEvent) == {
        "id": 1,
        "kind": 2,
        "at": 3,
        "user_id": 4,
        "session_id": 5,
        "ip": 6,
        "detail_json": 7,
    }
    assert _numbers(api_token_pb2.ApiToken) == {
        "token_id": 1,
        "name": 2,
        "prefix": 3,
        "scopes": 4,
        "allowed_cidrs": 5,
        "created_at": 6,
        "expires_at": 7,
        "last_used_at": 8,
    }
    assert _numbers(api_token_pb2.CreateApiTokenRequest) == {
        "client": 1,
        "access_token": 2,
        "name": 3,
        "scopes": 4,
        "ttl": 5,
        "allowed_cidrs": 6,
    }
    assert _numbers(api_token_pb2.CreateApiTokenResponse) == {"token": 1, "secret": 2}
    assert _numbers(api_token_pb2.VerifyApiTokenRequest) == {"secret": 1, "ip": 2, "required_scopes": 3}
    assert _numbers(api_token_pb2.VerifyApiTokenResponse) == {"user_id": 1, "token_id": 2, "scopes": 3}
    assert _numbers(event_pb2.WatchEventsRequest) == {"after_cursor": 1, "kinds": 2}
    assert _numbers(event_pb2.Event) == {
        "cursor": 1,
        "id": 2,
        "kind": 3,
        "at": 4,
        "user_id": 5,
        "session_id": 6,
        "data_json": 7,
    }
    watch = event_pb2.DESCRIPTOR.services_by_name["EventService"].methods_by_name["WatchEvents"]
    assert watch.server_streaming
    assert not watch.client_streaming
    assert watch.output_type.full_name == "iam.v1.WatchEventsResponse"
    assert _numbers(mfa_pb2.StartPasskeyLoginRequest) == {"client": 1, "email": 2}
    assert _numbers(mfa_pb2.FinishPasskeyLoginRequest) == {
        "client": 1,
        "challenge_id": 2,
        "credential_json": 3,
    }
    assert _numbers(mfa_pb2.ConfirmTotpRequest) == {
        "client": 1,
        "access_token": 2,
        "enrollment_id": 3,
        "code": 4,
    }
    assert _numbers(auth_pb2.SignInWithIdTokenRequest) == {
        "client": 1,
        "provider": 2,
        "id_token": 3,
        "nonce": 4,
    }
    assert _numbers(auth_pb2.LinkIdentityRequest) == {
        "client": 1,
        "access_token": 2,
        "provider": 3,
        "id_token": 4,
        "nonce": 5,
    }
    # The sign-in results decode as a LoginResponse and back (password_breached's number stays free).
    login = _numbers(auth_pb2.LoginResponse)
    for result in (auth_pb2.SignInWithIdTokenResponse, mfa_pb2.FinishPasskeyLoginResponse):
        assert _numbers(result) == {"session": 1, "mfa": 2}
        assert all(login[name] == number for name, number in _numbers(result).items())
        assert list(result.DESCRIPTOR.oneofs_by_name) == ["result"]
        wire = result(mfa=common_pb2.MfaChallenge(challenge_id="ch_x", channels=["totp"])).SerializeToString()
        assert auth_pb2.LoginResponse.FromString(wire).mfa.channels == ["totp"]


def test_end_user_requests_carry_the_client_context_first_and_admin_requests_do_not() -> None:
    """api.md: every RPC a BFF makes for a browser has `ClientContext client = 1`; the admin RPCs
    and the service-facing verifications have none."""
    without_client = (
        {
            "iam.v1.TokenService/" + m
            for m in ("VerifyAccessToken", "RevokeSession", "RevokeAllSessions", "ListSessions", "GetJwks")
        }
        | {
            "iam.v1.MfaService/InspectMagicLink",
            "iam.v1.MfaService/ConsumeStepUpGrant",
            "iam.v1.ApiTokenService/VerifyApiToken",
            "iam.v1.EventService/WatchEvents",
        }
        | {
            "iam.v1.UserService/" + m
            for m in (
                "GetUser",
                "ListUsers",
                "DisableUser",
                "EnableUser",
                "GrantRole",
                "RevokeRole",
                "DeleteUser",
                "ExportUser",
                "ListAuditEvents",
            )
        }
    )
    for method, _, request in every_rpc():
        client = request.DESCRIPTOR.fields_by_number.get(1)  # type: ignore[attr-defined]
        has_client = client is not None and client.name == "client"
        assert has_client == (method not in without_client), method
        if has_client:
            assert client.message_type.full_name == "iam.v1.ClientContext", method


WITH_INPUT = [
    pytest.param(
        *rpc,
        id=rpc[0],
        # Declared before its servicer lands (tests/contract_helper.py): strict, so a servicer that
        # lands fails here until the RPC leaves PENDING_RPCS and every walker covers it.
        marks=[pytest.mark.xfail(strict=True, reason="servicer not landed")]
        if is_pending(*rpc[0].split("/"))
        else [],
    )
    for rpc in every_rpc()
    # GetJwks takes nothing; an empty ListUsers or ListAuditEvents is the first page of everything;
    # an empty WatchEvents watches every kind from now on (tests/integration/test_event_stream.py)
    if rpc[0]
    not in (
        "iam.v1.TokenService/GetJwks",
        "iam.v1.UserService/ListUsers",
        "iam.v1.UserService/ListAuditEvents",
        "iam.v1.EventService/WatchEvents",
    )
]


@pytest.mark.parametrize(("method", "stub", "request_message"), WITH_INPUT)
async def test_every_rpc_is_answered_by_its_servicer(
    channel: grpc.aio.Channel, method: str, stub: object, request_message: object
) -> None:
    """No RPC of the contract is left UNIMPLEMENTED: an empty request reaches a servicer and gets a
    rich error of its own (ErrorInfo in domain iam.v1)."""
    rpc = getattr(stub(channel), method.split("/")[1])  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = rpc(request_message)
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call
    details = error_details(caught.value)
    assert details.code != grpc.StatusCode.UNIMPLEMENTED
    assert details.reason not in (None, "UNIMPLEMENTED")
    assert details.domain == "iam.v1"


async def _call_with_metadata(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> tuple[dict[str, str], dict[str, str]]:
    call = auth_pb2_grpc.AuthServiceStub(channel).Login(auth_pb2.LoginRequest(), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    initial = dict(await call.initial_metadata() or ())
    trailing = dict(await call.trailing_metadata() or ())
    return initial, trailing


async def test_a_valid_request_id_is_echoed(channel: grpc.aio.Channel) -> None:
    """A well-formed x-request-id comes back in initial and trailing metadata."""
    initial, trailing = await _call_with_metadata(channel, (("x-request-id", "req-1234.abc:XYZ"),))
    assert initial["x-request-id"] == "req-1234.abc:XYZ"
    assert trailing["x-request-id"] == "req-1234.abc:XYZ"


@pytest.mark.parametrize("offered", [None, "short", "has space in it", "x" * 129, "bad/slash-12345"])
async def test_a_missing_or_malformed_request_id_is_replaced(
    channel: grpc.aio.Channel, offered: str | None
) -> None:
    """Without a valid x-request-id the server generates a UUID and echoes that."""
    metadata = (("x-request-id", offered),) if offered is not None else ()
    initial, trailing = await _call_with_metadata(channel, metadata)
    generated = initial["x-request-id"]
    assert generated != offered
    assert uuid.UUID(generated).version == 4
    assert trailing["x-request-id"] == generated


async def test_malformed_payload_is_invalid_argument_and_the_server_keeps_serving(
    channel: grpc.aio.Channel,
) -> None:
    """Bytes that do not decode as the request message give INVALID_ARGUMENT, never INTERNAL."""
    raw = channel.unary_unary(
        "/iam.v1.AuthService/Login", request_serializer=None, response_deserializer=None
    )
    for payload in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x12\x05ab"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(payload)
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "INVALID_ARGUMENT"
        assert "request" in details.field_violations
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_oversized_requests_are_refused_and_the_server_keeps_serving(channel: grpc.aio.Channel) -> None:
    """A request over 64 KiB is RESOURCE_EXHAUSTED; the next normal call is answered."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Login(auth_pb2.LoginRequest(password="x" * (65 * 1024)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as normal:
        await stub.Login(auth_pb2.LoginRequest(password="x" * 100))
    assert normal.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # answered by the servicer


async def _http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def test_healthz_reports_serving(service: RunningService) -> None:
    """GET /healthz answers 200 with the serving status."""
    assert service.http_port is not None
    status, headers, body = await _http_get(service.http_port, "/healthz")
    assert status == 200
    answer = json.loads(body)
    assert answer["status"] == "SERVING"
    assert set(answer["dependencies"].values()) == {"up"}
    assert headers["content-type"] == "application/json"


async def test_metrics_count_rpcs_by_method_and_code(
    service: RunningService, channel: grpc.aio.Channel
) -> None:
    """/metrics exposes per-RPC counters and latency histograms in Prometheus text."""
    with pytest.raises(grpc.aio.AioRpcError):
        await mfa_pb2_grpc.MfaServiceStub(channel).InspectMagicLink(mfa_pb2.InspectMagicLinkRequest())
    assert service.http_port is not None
    status, headers, body = await _http_get(service.http_port, "/metrics")
    text = body.decode()
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert 'iam_rpc_total{code="INVALID_ARGUMENT",method="/iam.v1.MfaService/InspectMagicLink"}' in text
    assert 'iam_rpc_duration_seconds_bucket{le="0.005",method="/iam.v1.MfaService/InspectMagicLink"}' in text
    assert "iam_sql_statements_total" in text


async def test_unknown_paths_and_methods_are_refused(service: RunningService) -> None:
    """The ops listener answers 404 for unknown paths and 405 for anything but GET/HEAD."""
    assert service.http_port is not None
    assert (await _http_get(service.http_port, "/nope"))[0] == 404
    assert (await _http_get(service.http_port, "/healthz", method="POST"))[0] == 405
    status, _, body = await _http_get(service.http_port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")


async def test_the_service_restarts_on_its_own_data(backend: Backend, tmp_path: Path) -> None:
    """A second start on the same data directory and database reuses keys and secrets."""
    environ = backend.isolated()
    async with running_service(tmp_path, environ) as first:
        kids = {key["kid"] for key in first.app.components.keys.jwks()["keys"]}
    async with running_service(tmp_path, environ) as second:
        again = {key["kid"] for key in second.app.components.keys.jwks()["keys"]}
    assert kids
    assert kids <= again
