"""iam.v1.ApiTokenService: decode, call :class:`~iam_grpc.core.api_tokens.ApiTokens`, encode."""

from __future__ import annotations

from datetime import timedelta

from iam_grpc.core.api_tokens import SCOPE, ApiTokens, NewApiToken
from iam_grpc.core.call import current_call
from iam_grpc.core.validation import Violations
from iam_grpc.ids import ULID_RE
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import api_token_pb2, api_token_pb2_grpc
from iam_grpc.services.convert import client_info, timestamp
from iam_grpc.services.user_requests import check_used_from
from iam_grpc.storage.records import ApiTokenRecord

__all__ = ["ApiTokenService", "api_token_message"]

_MAX_REQUIRED = 32


def api_token_message(token: ApiTokenRecord) -> api_token_pb2.ApiToken:
    message = api_token_pb2.ApiToken(
        token_id=token.id,
        name=token.name,
        prefix=token.prefix,
        scopes=sorted(token.scopes),
        allowed_cidrs=list(token.allowed_cidrs),
        created_at=timestamp(token.created_at),
    )
    if token.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(token.expires_at))
    if token.last_used_at is not None:
        message.last_used_at.CopyFrom(timestamp(token.last_used_at))
    return message


def verified_ip(offered: str) -> str:
    """The address a token is used from: ``ip`` from a caller trusted to relay addresses, else the
    connection's peer (the trust rule of ClientContext.ip)."""
    call = current_call()
    if call is not None and call.caller is not None and call.caller.trust_client_ip and offered:
        return offered
    return (call.peer_ip if call is not None else None) or ""


def _check_token_id(violations: Violations, token_id: str) -> None:
    if not ULID_RE.match(token_id):
        violations.add("token_id", "must be an API token id (26 characters, ULID)")


class ApiTokenService(api_token_pb2_grpc.ApiTokenServiceServicer):
    def __init__(self, tokens: ApiTokens) -> None:
        self._tokens = tokens

    async def CreateApiToken(
        self, request: api_token_pb2.CreateApiTokenRequest, context: Ctx
    ) -> api_token_pb2.CreateApiTokenResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        ttl: timedelta | None = None
        if request.HasField("ttl") and (request.ttl.seconds or request.ttl.nanos):
            if request.ttl.seconds < 0 or request.ttl.nanos < 0:
                violations.add("ttl", "must be unset or between 1 minute and 3650 days")
            else:
                ttl = request.ttl.ToTimedelta()
        violations.raise_any()
        form = NewApiToken(request.name, list(request.scopes), ttl, list(request.allowed_cidrs))
        issued = await self._tokens.create(client, request.access_token, form)
        return api_token_pb2.CreateApiTokenResponse(
            token=api_token_message(issued.token), secret=issued.secret
        )

    async def ListApiTokens(
        self, request: api_token_pb2.ListApiTokensRequest, context: Ctx
    ) -> api_token_pb2.ListApiTokensResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        tokens = await self._tokens.list(client, request.access_token)
        return api_token_pb2.ListApiTokensResponse(tokens=[api_token_message(t) for t in tokens])

    async def RevokeApiToken(
        self, request: api_token_pb2.RevokeApiTokenRequest, context: Ctx
    ) -> api_token_pb2.RevokeApiTokenResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        _check_token_id(violations, request.token_id)
        violations.raise_any()
        await self._tokens.revoke(client, request.access_token, request.token_id)
        return api_token_pb2.RevokeApiTokenResponse()

    async def RotateApiToken(
        self, request: api_token_pb2.RotateApiTokenRequest, context: Ctx
    ) -> api_token_pb2.RotateApiTokenResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        _check_token_id(violations, request.token_id)
        violations.raise_any()
        issued = await self._tokens.rotate(client, request.access_token, request.token_id)
        return api_token_pb2.RotateApiTokenResponse(
            token=api_token_message(issued.token), secret=issued.secret
        )

    async def VerifyApiToken(
        self, request: api_token_pb2.VerifyApiTokenRequest, context: Ctx
    ) -> api_token_pb2.VerifyApiTokenResponse:
        violations = Violations()
        if len(request.required_scopes) > _MAX_REQUIRED:
            violations.add("required_scopes", "at most 32 scopes")
        elif not all(SCOPE.match(s) for s in request.required_scopes):
            violations.add("required_scopes", "each scope matches ^[a-z0-9:._-]{1,64}$")
        check_used_from(violations, request.ip)
        violations.raise_any()
        verified = await self._tokens.verify(
            request.secret, verified_ip(request.ip), list(request.required_scopes)
        )
        call = current_call()
        if call is not None:
            call.user_id = verified.user_id
        return api_token_pb2.VerifyApiTokenResponse(
            user_id=verified.user_id, token_id=verified.token_id, scopes=list(verified.scopes)
        )
