"""iam.v1.MfaService's TOTP RPCs (EnrollTotp, ConfirmTotp, DisableTotp), mixed into MfaService."""

from __future__ import annotations

from iam_grpc.core.mfa.totp_enrollment import TotpEnrollment
from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import mfa_pb2
from iam_grpc.services.convert import client_info

__all__ = ["TotpRpcs"]


class TotpRpcs:
    """Decode, call ``TotpEnrollment``, encode. The servicer sets ``_totp``."""

    _totp: TotpEnrollment

    async def EnrollTotp(
        self, request: mfa_pb2.EnrollTotpRequest, context: Ctx
    ) -> mfa_pb2.EnrollTotpResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        enrollment = await self._totp.enroll(client, request.access_token, violations)
        return mfa_pb2.EnrollTotpResponse(
            enrollment_id=enrollment.id,
            secret_base32=enrollment.secret_base32,
            otpauth_uri=enrollment.otpauth_uri,
        )

    async def ConfirmTotp(
        self, request: mfa_pb2.ConfirmTotpRequest, context: Ctx
    ) -> mfa_pb2.ConfirmTotpResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        codes = await self._totp.confirm(
            client, request.access_token, request.enrollment_id, request.code, violations
        )
        return mfa_pb2.ConfirmTotpResponse(recovery_codes=codes)

    async def DisableTotp(
        self, request: mfa_pb2.DisableTotpRequest, context: Ctx
    ) -> mfa_pb2.DisableTotpResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._totp.disable(client, request.access_token, request.step_up_grant, violations)
        return mfa_pb2.DisableTotpResponse()
