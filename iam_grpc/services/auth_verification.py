"""iam.v1.AuthService's RequestEmailVerification, mixed into AuthService."""

from __future__ import annotations

from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import auth_pb2
from iam_grpc.services.convert import client_info

__all__ = ["EmailVerificationRpcs"]


class EmailVerificationRpcs:
    """Decode, call ``EmailVerification``, encode. The servicer sets ``_verification``."""

    _verification: EmailVerification

    async def RequestEmailVerification(
        self, request: auth_pb2.RequestEmailVerificationRequest, context: Ctx
    ) -> auth_pb2.RequestEmailVerificationResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._verification.request(client, request.access_token, violations)
        return auth_pb2.RequestEmailVerificationResponse()
