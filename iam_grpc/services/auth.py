"""iam.v1.AuthService."""

from __future__ import annotations

from iam_grpc._proto.iam.v1 import auth_pb2, auth_pb2_grpc
from iam_grpc.core.tokens.sessions import SessionManager
from iam_grpc.errors import NotImplementedYet
from iam_grpc.interceptors.base import Context as Ctx

__all__ = ["AuthService"]


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions

    async def Signup(self, request: auth_pb2.SignupRequest, context: Ctx) -> auth_pb2.SignupResponse:
        raise NotImplementedYet()

    async def Login(self, request: auth_pb2.LoginRequest, context: Ctx) -> auth_pb2.LoginResponse:
        raise NotImplementedYet()

    async def Logout(self, request: auth_pb2.LogoutRequest, context: Ctx) -> auth_pb2.LogoutResponse:
        await self._sessions.logout(request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def RequestPasswordReset(
        self, request: auth_pb2.RequestPasswordResetRequest, context: Ctx
    ) -> auth_pb2.RequestPasswordResetResponse:
        raise NotImplementedYet()

    async def ResetPassword(
        self, request: auth_pb2.ResetPasswordRequest, context: Ctx
    ) -> auth_pb2.ResetPasswordResponse:
        raise NotImplementedYet()

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: Ctx
    ) -> auth_pb2.ChangePasswordResponse:
        raise NotImplementedYet()

    async def RequestEmailChange(
        self, request: auth_pb2.RequestEmailChangeRequest, context: Ctx
    ) -> auth_pb2.RequestEmailChangeResponse:
        raise NotImplementedYet()

    async def ConfirmEmailChange(
        self, request: auth_pb2.ConfirmEmailChangeRequest, context: Ctx
    ) -> auth_pb2.ConfirmEmailChangeResponse:
        raise NotImplementedYet()
