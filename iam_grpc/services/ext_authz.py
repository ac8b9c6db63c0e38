"""envoy.service.auth.v3.Authorization/Check: Envoy's ``ext_authz`` filter asks, for each HTTP
request, whether it may reach the upstream (behaviour.md 1.2 and 2.8; security.md S64).

The bearer token of the ``authorization`` header is verified like VerifyAccessToken (steps 1-8,
deny-lists included, so a revocation applies at once) with the roles of the first
``ext_authz.rules`` prefix that covers the request path (whole segments, after normalisation,
under every reading an upstream may take: see :class:`PathRules`). The answer is always a
``CheckResponse``, never a gRPC error, except when the calling Envoy itself is not an allowed
caller:

- allowed: ``authorization`` and every other ``x-iam-*`` header from the client are removed, and
  ``x-iam-user-id``, ``x-iam-session-id`` and ``x-iam-roles`` are set (overwriting), so the
  upstream can trust them; a personal API token (``Bearer iam_pat_...``, verified like
  VerifyApiToken from the request's source address, a rule's roles required as its scopes) sets
  ``x-iam-user-id`` and ``x-iam-token-id`` instead;
- bad, missing, expired or revoked token: status UNAUTHENTICATED, HTTP 401 with
  ``www-authenticate: Bearer error="invalid_token"``;
- a rule's role missing: PERMISSION_DENIED, HTTP 403;
- anything that is not a decision (a store down, a bug): that status with an ``error_response``,
  which Envoy treats as a failed check: ``failure_mode_allow`` and ``status_on_error`` decide.

This module imports the Envoy messages (xds-protos); the server imports it only when
``ext_authz.enabled``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from iam_grpc.config import ExtAuthzRule
from iam_grpc.core.api_tokens import PREFIX as API_TOKEN_PREFIX
from iam_grpc.core.api_tokens import ApiTokens, VerifiedApiToken
from iam_grpc.core.call import current_call
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.errors import ErrorCode, IamError, InternalError, ServerError, TokenInvalid
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor
from iam_grpc.interceptors.errors import grpc_code
from iam_grpc.logging import component_logger

__all__ = [
    "CHECK_METHOD",
    "SERVICE_NAME",
    "CheckAnswerInterceptor",
    "ExtAuthzService",
    "PathRules",
    "add_to_server",
    "normalise_path",
]

SERVICE_NAME: str = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
CHECK_METHOD = f"/{SERVICE_NAME}/Check"

IDENTITY_PREFIX = "x-iam-"
USER_HEADER = "x-iam-user-id"
SESSION_HEADER = "x-iam-session-id"
ROLES_HEADER = "x-iam-roles"
TOKEN_HEADER = "x-iam-token-id"  # noqa: S105 - a header name, not a secret
CHALLENGE = 'Bearer error="invalid_token"'
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

log = component_logger("iam.ext_authz")


def normalise_path(target: str, *, cut_parameters: bool = True) -> str:
    """The path rules are matched against: no query or fragment, %-escapes decoded, backslashes as
    slashes, path parameters (``;name=value``, RFC 3986 3.3) cut from every segment, empty and ``.``
    segments dropped, ``..`` applied. An upstream that normalises paths itself then cannot be
    reached under a prefix that a rule protects by spelling it differently (``/public/../admin``,
    ``//admin``, ``/%61dmin``, ``/admin;x=1/users``, ``/public/..;/admin``: servlet containers
    drop path parameters before routing). ``cut_parameters=False`` keeps them, as an upstream that
    treats ``;`` as an ordinary character reads the path."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    path = unquote(path).replace("\\", "/")
    segments: list[str] = []
    for raw in path.split("/"):
        segment = raw.split(";", 1)[0] if cut_parameters else raw
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = "/" if segments and path.endswith("/") else ""
    return "/" + "/".join(segments) + trailing


def _segments(prefix: str) -> str:
    """A rule's prefix as whole segments: ``/admin/`` and ``/admin`` both mean the ``/admin``
    segment and everything below it."""
    return "/" + prefix.strip("/")


def _covers(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


class PathRules:
    """``ext_authz.rules``: the first rule whose prefix covers the path gives the roles.

    A prefix covers whole segments (``/admin`` covers ``/admin`` and ``/admin/users``, never
    ``/administrator``). Upstreams read paths differently: some ignore case, some drop ``;``
    parameters. So a path is read every way an upstream might (parameters cut or kept, case kept
    or folded), each reading picks its first matching rule, and the roles of all of them are
    required. A rule cannot be dodged by spelling (``/ADMIN;x=1/users``), and an exception listed
    first (``/billing/public`` open, ``/billing`` not) only applies when every reading agrees,
    so ``/billing/PUBLIC`` still needs ``billing``. The cost is a 403 instead of a 404 on spellings
    the upstream does not serve."""

    def __init__(self, rules: Sequence[ExtAuthzRule]) -> None:
        self._exact = tuple((_segments(rule.prefix), tuple(rule.roles)) for rule in rules)
        self._folded = tuple((prefix.casefold(), roles) for prefix, roles in self._exact)

    def roles_for(self, target: str) -> tuple[str, ...]:
        if not self._exact:
            return ()
        required: set[str] = set()
        for path in {normalise_path(target), normalise_path(target, cut_parameters=False)}:
            for rules, reading in ((self._exact, path), (self._folded, path.casefold())):
                for prefix, roles in rules:
                    if _covers(prefix, reading):
                        required.update(roles)
                        break
        return tuple(sorted(required))


def _headers(http: Any) -> dict[str, str]:
    """The request headers Envoy sent: the ``headers`` map, or ``header_map`` when Envoy is set to
    ``encode_raw_headers``. Names are lower case (HTTP/2 spelling)."""
    if http.headers:
        return {key.lower(): value for key, value in http.headers.items()}
    out: dict[str, str] = {}
    for item in http.header_map.headers:
        value = item.raw_value.decode("latin-1") if item.raw_value else item.value
        name = item.key.lower()
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def bearer_token(authorization: str) -> str:
    """The token of ``Bearer <token>`` (scheme in any case); empty when there is none."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def allowed(claims: AccessClaims, headers: Mapping[str, str]) -> external_auth_pb2.CheckResponse:
    """OK: the identity headers set from the token, the credential and client copies removed.

    Envoy applies removals after additions, so the headers set here are never also listed for
    removal (they overwrite the client's values instead)."""
    identity = [(USER_HEADER, claims.user_id), (SESSION_HEADER, claims.session_id)]
    if claims.roles:  # an empty value would be dropped by Envoy; the client's copy is removed instead
        identity.append((ROLES_HEADER, ",".join(claims.roles)))
    set_names = {name for name, _ in identity}
    remove = {"authorization", *(n for n in headers if n.startswith(IDENTITY_PREFIX))} - set_names
    if not claims.roles:
        remove.add(ROLES_HEADER)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(name, value) for name, value in identity],
            headers_to_remove=sorted(remove),
        ),
    )


def refused(error: IamError) -> external_auth_pb2.CheckResponse:
    """The answer for an error: a denial (401 or 403) when it is a decision about the request,
    otherwise a failed check that Envoy handles by its ``failure_mode_allow`` / ``status_on_error``."""
    status = status_pb2.Status(code=grpc_code(error).value[0], message=error.message)
    if error.code is ErrorCode.UNAUTHENTICATED:
        return external_auth_pb2.CheckResponse(
            status=status,
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
                headers=[_header("www-authenticate", CHALLENGE)],
                body=error.message,
            ),
        )
    if error.code is ErrorCode.PERMISSION_DENIED:
        return external_auth_pb2.CheckResponse(
            status=status,
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden), body=error.message
            ),
        )
    # error_response (not denied_response) marks "no decision": Envoy's status_on_error applies
    return external_auth_pb2.CheckResponse(
        status=status, error_response=external_auth_pb2.DeniedHttpResponse()
    )


def _answer_error(error: IamError) -> external_auth_pb2.CheckResponse:
    """Record the outcome for the access log and metrics, and answer it in the message."""
    call = current_call()
    if call is not None:
        call.code = grpc_code(error).name
        call.reason = error.reason
    if isinstance(error, ServerError):
        log.bind(reason=error.reason, **error.cause()).warning("check failed on our side")
    return refused(error)


def allowed_api_token(
    verified: VerifiedApiToken, headers: Mapping[str, str]
) -> external_auth_pb2.CheckResponse:
    """OK for a personal API token: ``x-iam-user-id`` and ``x-iam-token-id`` set, the credential
    and every client copy of an identity header removed (an API token has no session)."""
    identity = [(USER_HEADER, verified.user_id), (TOKEN_HEADER, verified.token_id)]
    remove = {
        "authorization",
        SESSION_HEADER,
        ROLES_HEADER,
        *(n for n in headers if n.startswith(IDENTITY_PREFIX)),
    }
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(name, value) for name, value in identity],
            headers_to_remove=sorted(remove - {USER_HEADER, TOKEN_HEADER}),
        ),
    )


class ExtAuthzService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # no stubs
    def __init__(
        self, access: AccessTokens, rules: Sequence[ExtAuthzRule], api_tokens: ApiTokens | None = None
    ) -> None:
        self._access = access
        self._rules = PathRules(rules)
        self._api_tokens = api_tokens

    async def _check_api_token(
        self, request: external_auth_pb2.CheckRequest, token: str, headers: Mapping[str, str]
    ) -> external_auth_pb2.CheckResponse:
        """``Bearer iam_pat_...``: verified like VerifyApiToken from the request's source address;
        a path rule's roles are required as the token's scopes."""
        assert self._api_tokens is not None
        http = request.attributes.request.http
        source = request.attributes.source.address.socket_address.address
        try:
            verified = await self._api_tokens.verify(token, source, self._rules.roles_for(http.path))
        except IamError as error:
            return _answer_error(error)
        call = current_call()
        if call is not None:
            call.user_id = verified.user_id
        return allowed_api_token(verified, headers)

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Context
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        headers = _headers(http)
        try:
            token = bearer_token(headers.get("authorization", ""))
            if not token:
                raise TokenInvalid()
            if token.startswith(API_TOKEN_PREFIX) and self._api_tokens is not None:
                return await self._check_api_token(request, token, headers)
            claims = await self._access.verify(token, self._rules.roles_for(http.path))
        except IamError as error:
            return _answer_error(error)
        call = current_call()
        if call is not None:
            call.user_id = claims.user_id
        return allowed(claims, headers)


class CheckAnswerInterceptor(UnaryInterceptor):
    """Inside caller authentication: whatever fails below it on a ``Check`` call (a malformed
    request, a request hook, a bug) is answered as a failed check in a ``CheckResponse``, the form
    Envoy understands, instead of a gRPC error. Caller authentication failures stay gRPC errors."""

    def applies_to(self, method: str) -> bool:
        return method == CHECK_METHOD

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            try:
                return await behaviour(request, context)
            except IamError as error:
                return _answer_error(error)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("unexpected error")
                return _answer_error(InternalError())

        return run


def add_to_server(
    access: AccessTokens,
    rules: Sequence[ExtAuthzRule],
    server: grpc.aio.Server,
    api_tokens: ApiTokens | None = None,
) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        ExtAuthzService(access, rules, api_tokens), server
    )
