"""iam.v1.TokenService."""

from __future__ import annotations

import json

from iam_grpc.core.call import current_call
from iam_grpc.core.challenges import Challenge
from iam_grpc.core.keys import KeyRing
from iam_grpc.core.passkey_login import PasskeyLogin
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.refresh import RefreshRotation
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_roles
from iam_grpc.errors import InvalidArgument
from iam_grpc.ids import ULID_RE
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.services.auth import challenge_message
from iam_grpc.services.convert import client_info, session_message, timestamp
from iam_grpc.services.mfa_passkeys import offer_passkey
from iam_grpc.ua import ParsedAgent

__all__ = ["TokenService"]


class TokenService(token_pb2_grpc.TokenServiceServicer):
    def __init__(
        self,
        access: AccessTokens,
        sessions: Sessions,
        refresh: RefreshRotation,
        keys: KeyRing,
        passkeys: PasskeyLogin,
    ) -> None:
        self._access = access
        self._sessions = sessions
        self._refresh = refresh
        self._keys = keys
        self._passkeys = passkeys  # a refresh challenge offers the user's passkeys too

    async def Refresh(self, request: token_pb2.RefreshRequest, context: Ctx) -> token_pb2.RefreshResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        answer = await self._refresh.refresh(client, request.refresh_token)
        _note_user(answer.user_id)
        if isinstance(answer, Challenge):
            return token_pb2.RefreshResponse(
                mfa=await offer_passkey(challenge_message(answer), answer, self._passkeys)
            )
        return token_pb2.RefreshResponse(session=session_message(answer))

    async def VerifyAccessToken(
        self, request: token_pb2.VerifyAccessTokenRequest, context: Ctx
    ) -> token_pb2.VerifyAccessTokenResponse:
        violations = Violations()
        check_roles(violations, "required_roles", list(request.required_roles))
        violations.raise_any()
        claims = await self._access.verify(request.access_token, list(request.required_roles))
        _note_user(claims.user_id)
        return token_pb2.VerifyAccessTokenResponse(
            user_id=claims.user_id,
            session_id=claims.session_id,
            device_id=claims.device_id,
            roles=list(claims.roles),
            expires_at=timestamp(claims.expires_at),
            jti=claims.jti,
        )

    async def RevokeSession(
        self, request: token_pb2.RevokeSessionRequest, context: Ctx
    ) -> token_pb2.RevokeSessionResponse:
        if not ULID_RE.match(request.session_id):
            # no session has such an id: the field is malformed, which says nothing about anyone
            raise InvalidArgument.one("session_id", "must be a session id (26 characters, ULID)")
        claims = await self._access.verify(request.access_token)
        _note_user(claims.user_id)
        await self._sessions.revoke_session(claims, request.session_id)
        return token_pb2.RevokeSessionResponse()

    async def RevokeAllSessions(
        self, request: token_pb2.RevokeAllSessionsRequest, context: Ctx
    ) -> token_pb2.RevokeAllSessionsResponse:
        claims = await self._access.verify(request.access_token)
        _note_user(claims.user_id)
        await self._sessions.revoke_all(claims, keep_current=request.keep_current)
        return token_pb2.RevokeAllSessionsResponse()

    async def ListSessions(
        self, request: token_pb2.ListSessionsRequest, context: Ctx
    ) -> token_pb2.ListSessionsResponse:
        claims = await self._access.verify(request.access_token)
        _note_user(claims.user_id)
        answer = token_pb2.ListSessionsResponse()
        for view in await self._sessions.list_sessions(claims):
            session, device = view.session, view.device
            agent = ParsedAgent(
                browser_family=(device.browser_family if device else None) or session.last_browser,
                browser_major=device.browser_major if device else None,
                os_family=(device.os_family if device else None) or session.last_os,
                device_type=device.device_type if device else None,
            )
            answer.sessions.append(
                token_pb2.SessionInfo(
                    session_id=session.id,
                    device_label=agent.label,
                    browser_family=agent.browser_family or "",
                    browser_major=agent.browser_major or "",
                    os_family=agent.os_family or "",
                    device_type=agent.device_type or "",
                    country=session.last_country or "",
                    region=session.last_region or "",
                    city=session.last_city or "",
                    created_at=timestamp(session.created_at),
                    last_seen_at=timestamp(session.last_refreshed_at),
                    current=view.current,
                )
            )
        return answer

    async def GetJwks(self, request: token_pb2.GetJwksRequest, context: Ctx) -> token_pb2.GetJwksResponse:
        return token_pb2.GetJwksResponse(jwks_json=json.dumps(self._keys.jwks(), separators=(",", ":")))


def _note_user(user_id: str) -> None:
    """The access log names the user once the token is known."""
    call = current_call()
    if call is not None:
        call.user_id = user_id
