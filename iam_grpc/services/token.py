"""iam.v1.TokenService."""

from __future__ import annotations

from iam_grpc._proto.iam.v1 import token_pb2, token_pb2_grpc
from iam_grpc.errors import NotImplementedYet
from iam_grpc.interceptors.base import Context as Ctx

__all__ = ["TokenService"]


class TokenService(token_pb2_grpc.TokenServiceServicer):
    async def Refresh(self, request: token_pb2.RefreshRequest, context: Ctx) -> token_pb2.RefreshResponse:
        raise NotImplementedYet()

    async def VerifyAccessToken(
        self, request: token_pb2.VerifyAccessTokenRequest, context: Ctx
    ) -> token_pb2.VerifyAccessTokenResponse:
        raise NotImplementedYet()

    async def RevokeSession(
        self, request: token_pb2.RevokeSessionRequest, context: Ctx
    ) -> token_pb2.RevokeSessionResponse:
        raise NotImplementedYet()

    async def RevokeAllSessions(
        self, request: token_pb2.RevokeAllSessionsRequest, context: Ctx
    ) -> token_pb2.RevokeAllSessionsResponse:
        raise NotImplementedYet()

    async def ListSessions(
        self, request: token_pb2.ListSessionsRequest, context: Ctx
    ) -> token_pb2.ListSessionsResponse:
        raise NotImplementedYet()

    async def GetJwks(self, request: token_pb2.GetJwksRequest, context: Ctx) -> token_pb2.GetJwksResponse:
        raise NotImplementedYet()
