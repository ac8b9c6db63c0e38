"""The grpc.aio server: options, TLS, the interceptor chain, services,
health and reflection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from iam_grpc.config import Settings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.interceptors.access_log import AccessLogInterceptor
from iam_grpc.interceptors.base import RequestInterceptor, UnaryInterceptor
from iam_grpc.interceptors.callers import CallerAuthInterceptor, CallerRegistry, host_is_loopback
from iam_grpc.interceptors.client_ip import ClientIpInterceptor
from iam_grpc.interceptors.context import RequestContextInterceptor
from iam_grpc.interceptors.deadline import DeadlineInterceptor
from iam_grpc.interceptors.decode import DecodeGuardInterceptor
from iam_grpc.interceptors.errors import ErrorMappingInterceptor
from iam_grpc.interceptors.failpoints import FailpointInterceptor
from iam_grpc.interceptors.fused import FusedChain
from iam_grpc.interceptors.ratelimit import RateLimitInterceptor
from iam_grpc.metrics import Metrics
from iam_grpc.proto import (
    api_token_pb2,
    api_token_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from iam_grpc.services.auth import AuthFlows, AuthService
from iam_grpc.services.events import EventService
from iam_grpc.services.mfa import MfaService
from iam_grpc.services.token import TokenService
from iam_grpc.storage.ports import Ephemeral
from iam_grpc.wiring import Components

__all__ = [
    "EXT_AUTHZ_SERVICE",
    "SERVICES",
    "SERVICE_NAMES",
    "ListenError",
    "Service",
    "build_server",
    "interceptor_chain",
    "served_services",
    "server_options",
]


@dataclass(frozen=True, slots=True)
class Service:
    """One service of ``iam.v1``: its full name (for health and reflection) and how its servicer
    is registered over the components."""

    name: str
    register: Callable[[Components, grpc.aio.Server], None]


def _auth(c: Components, server: grpc.aio.Server) -> None:
    flows = AuthFlows(c.signup, c.login, c.password_reset, c.password_change, c.email_change)
    # The protos declare RPCs before their servicers land; until then the generated base answers
    # them (NotImplementedError, mapped to UNIMPLEMENTED). strict mypy flags these ignores as
    # unused once every method of the service is implemented.
    service = AuthService(c.sessions, flows, c.sign_in, c.verification)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(service, server)


def _token(c: Components, server: grpc.aio.Server) -> None:
    token_pb2_grpc.add_TokenServiceServicer_to_server(
        TokenService(c.access, c.sessions, c.refresh, c.keys, c.sign_in.passkey_login), server
    )


def _mfa(c: Components, server: grpc.aio.Server) -> None:
    service = MfaService(c.codes, c.magic_links, c.step_up, c.sign_in, c.totp_enrollment)
    mfa_pb2_grpc.add_MfaServiceServicer_to_server(service, server)


def _users(c: Components, server: grpc.aio.Server) -> None:
    from iam_grpc.admin import AdminTools
    from iam_grpc.services.users import UserService

    tools = AdminTools.from_components(c)
    user_pb2_grpc.add_UserServiceServicer_to_server(UserService(c.profiles, tools), server)


def _api_tokens(c: Components, server: grpc.aio.Server) -> None:
    from iam_grpc.services.api_tokens import ApiTokenService

    api_token_pb2_grpc.add_ApiTokenServiceServicer_to_server(ApiTokenService(c.api_tokens), server)


def _events(c: Components, server: grpc.aio.Server) -> None:
    event_pb2_grpc.add_EventServiceServicer_to_server(EventService(c.events), server)


SERVICES: tuple[Service, ...] = (
    Service(auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name, _auth),
    Service(token_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name, _token),
    Service(mfa_pb2.DESCRIPTOR.services_by_name["MfaService"].full_name, _mfa),
    Service(user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name, _users),
    Service(api_token_pb2.DESCRIPTOR.services_by_name["ApiTokenService"].full_name, _api_tokens),
    Service(event_pb2.DESCRIPTOR.services_by_name["EventService"].full_name, _events),
)
"""The services of ``iam.v1``: a new one is a servicer and one entry here."""
SERVICE_NAMES = tuple(service.name for service in SERVICES)
# Envoy's external authorization API (``ext_authz.enabled``); its messages are imported only then.
EXT_AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


def served_services(settings: Settings) -> tuple[str, ...]:
    """The services this configuration serves (besides health and reflection)."""
    return (*SERVICE_NAMES, EXT_AUTHZ_SERVICE) if settings.ext_authz.enabled else SERVICE_NAMES


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    s = settings.server
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_time_ms", int(s.keepalive_time.total_seconds() * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout.total_seconds() * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(s.max_connection_age.total_seconds() * 1000)),
        ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace.total_seconds() * 1000)),
        ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
    ]


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    tls = settings.server.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None
    assert tls.key_file is not None
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def interceptor_chain(
    settings: Settings,
    metrics: Metrics,
    request_hooks: Sequence[RequestInterceptor] = (),
    *,
    audit: AuditTrail | None = None,
    ephemeral: Ephemeral | None = None,
) -> list[UnaryInterceptor]:
    """The interceptors, outermost first; each has one job (see ``iam_grpc.interceptors``)."""
    check_answers: list[UnaryInterceptor] = []
    if settings.ext_authz.enabled:
        from iam_grpc.services.ext_authz import CheckAnswerInterceptor

        # Inside caller authentication: below it, a failing Check is answered in a CheckResponse.
        check_answers.append(CheckAnswerInterceptor())
    return [
        RequestContextInterceptor(settings.server.default_deadline),
        AccessLogInterceptor(
            metrics, hot_ok_level=settings.logging.hot_ok_level, log_exempt=settings.logging.access_log_probes
        ),
        ErrorMappingInterceptor(),
        DeadlineInterceptor(),
        CallerAuthInterceptor(
            CallerRegistry(
                settings.callers,
                embedded=settings.mode == "embedded",
                listening_on_loopback=host_is_loopback(settings.server.host),
            ),
            metrics,
            audit=audit,
            ephemeral=ephemeral,
        ),
        *check_answers,
        DecodeGuardInterceptor(),
        ClientIpInterceptor(),
        *request_hooks,  # rate limiting and validation see the decoded request here
    ]


def build_server(
    components: Components,
    health: health_aio.HealthServicer,
    outer: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int]:
    """Create the server with every service registered over ``components`` and bind its port
    (returned). ``outer`` interceptors run first (tracing: the RPC's span around everything)."""
    settings = components.settings
    hooks: list[RequestInterceptor] = [RateLimitInterceptor(components.limiter)]
    if components.failpoints.enabled:
        hooks.append(FailpointInterceptor(components.failpoints))
    chain = interceptor_chain(
        settings, components.metrics, hooks, audit=components.audit, ephemeral=components.ephemeral
    )
    server = grpc.aio.server(
        # tracing outermost, then our chain as one interceptor composed once per method
        interceptors=[*outer, FusedChain(chain)],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
    )
    for service in SERVICES:
        service.register(components, server)
    if settings.ext_authz.enabled:
        from iam_grpc.services import ext_authz

        ext_authz.add_to_server(components.access, settings.ext_authz.rules, server, components.api_tokens)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*served_services(settings), "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
    address = settings.grpc_address
    credentials = _credentials(settings)
    try:
        port = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(f"server.host/server.port (IAM_GRPC_LISTEN): cannot listen on {address}")
    return server, port


class ListenError(Exception):
    """The gRPC address cannot be bound (in use, or not a local address)."""
