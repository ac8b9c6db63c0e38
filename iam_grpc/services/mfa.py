"""iam.v1.MfaService."""

from __future__ import annotations

from iam_grpc._proto.iam.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from iam_grpc.errors import NotImplementedYet
from iam_grpc.interceptors.base import Context as Ctx

__all__ = ["MfaService"]


class MfaService(mfa_pb2_grpc.MfaServiceServicer):
    async def VerifyChallenge(
        self, request: mfa_pb2.VerifyChallengeRequest, context: Ctx
    ) -> mfa_pb2.VerifyChallengeResponse:
        raise NotImplementedYet()

    async def RedeemMagicLink(
        self, request: mfa_pb2.RedeemMagicLinkRequest, context: Ctx
    ) -> mfa_pb2.RedeemMagicLinkResponse:
        raise NotImplementedYet()

    async def InspectMagicLink(
        self, request: mfa_pb2.InspectMagicLinkRequest, context: Ctx
    ) -> mfa_pb2.InspectMagicLinkResponse:
        raise NotImplementedYet()

    async def ResendChallenge(
        self, request: mfa_pb2.ResendChallengeRequest, context: Ctx
    ) -> common_pb2.MfaChallenge:
        raise NotImplementedYet()

    async def StartStepUp(self, request: mfa_pb2.StartStepUpRequest, context: Ctx) -> common_pb2.MfaChallenge:
        raise NotImplementedYet()

    async def ConsumeStepUpGrant(
        self, request: mfa_pb2.ConsumeStepUpGrantRequest, context: Ctx
    ) -> mfa_pb2.ConsumeStepUpGrantResponse:
        raise NotImplementedYet()
