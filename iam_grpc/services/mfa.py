"""iam.v1.MfaService: decode, call the MFA flows, encode."""

from __future__ import annotations

from iam_grpc.core.mfa.codes import ChallengeCodes
from iam_grpc.core.mfa.completion import Outcome
from iam_grpc.core.mfa.magic_links import MagicLinks
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.mfa.totp_enrollment import TotpEnrollment
from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import common_pb2, mfa_pb2, mfa_pb2_grpc
from iam_grpc.services.auth import challenge_message
from iam_grpc.services.convert import client_info, session_message, timestamp
from iam_grpc.services.mfa_passkeys import PasskeyRpcs, offer_passkey
from iam_grpc.services.mfa_totp import TotpRpcs
from iam_grpc.wiring.signin import SignInMethods

__all__ = ["MfaService"]


def _grant(outcome: Outcome) -> common_pb2.StepUpGrant | None:
    if outcome.grant is None:
        return None
    return common_pb2.StepUpGrant(
        grant_token=outcome.grant.token,
        action=outcome.grant.action,
        expires_at=timestamp(outcome.grant.expires_at),
    )


class MfaService(PasskeyRpcs, TotpRpcs, mfa_pb2_grpc.MfaServiceServicer):
    def __init__(
        self,
        codes: ChallengeCodes,
        links: MagicLinks,
        step_up: StepUp,
        sign_in: SignInMethods,
        totp: TotpEnrollment,
    ) -> None:
        self._totp = totp
        self._codes = codes
        self._links = links
        self._step_up = step_up
        self._sign_in = sign_in

    async def VerifyChallenge(
        self, request: mfa_pb2.VerifyChallengeRequest, context: Ctx
    ) -> mfa_pb2.VerifyChallengeResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        if request.passkey_assertion_json:
            if request.code or request.recovery_code:
                violations.add("code", "send one of a code, a recovery code or a passkey assertion")
            outcome = await self._sign_in.passkey_login.verify_challenge(
                client, request.challenge_id, request.passkey_assertion_json, violations
            )
        else:
            outcome = await self._codes.verify(
                client, request.challenge_id, request.code, violations, recovery_code=request.recovery_code
            )
        if outcome.session is not None:
            return mfa_pb2.VerifyChallengeResponse(session=session_message(outcome.session))
        return mfa_pb2.VerifyChallengeResponse(grant=_grant(outcome))

    async def RedeemMagicLink(
        self, request: mfa_pb2.RedeemMagicLinkRequest, context: Ctx
    ) -> mfa_pb2.RedeemMagicLinkResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        outcome, purpose = await self._links.redeem(client, request.link_token, violations)
        if outcome.session is not None:
            return mfa_pb2.RedeemMagicLinkResponse(session=session_message(outcome.session), purpose=purpose)
        if outcome.grant is not None:
            return mfa_pb2.RedeemMagicLinkResponse(grant=_grant(outcome), purpose=purpose)
        return mfa_pb2.RedeemMagicLinkResponse(purpose=purpose)  # approved for the challenge's device

    async def InspectMagicLink(
        self, request: mfa_pb2.InspectMagicLinkRequest, context: Ctx
    ) -> mfa_pb2.InspectMagicLinkResponse:
        found = await self._links.inspect(request.link_token)
        answer = mfa_pb2.InspectMagicLinkResponse(purpose=found.purpose, usable=found.usable)
        if found.expires_at is not None:
            answer.expires_at.CopyFrom(timestamp(found.expires_at))
        return answer

    async def ResendChallenge(
        self, request: mfa_pb2.ResendChallengeRequest, context: Ctx
    ) -> common_pb2.MfaChallenge:
        violations = Violations()
        client = client_info(request.client, violations)
        challenge = await self._codes.resend(client, request.challenge_id, violations)
        return await offer_passkey(challenge_message(challenge), challenge, self._sign_in.passkey_login)

    async def StartStepUp(self, request: mfa_pb2.StartStepUpRequest, context: Ctx) -> common_pb2.MfaChallenge:
        violations = Violations()
        client = client_info(request.client, violations)
        challenge = await self._step_up.start(client, request.access_token, request.action, violations)
        return await offer_passkey(challenge_message(challenge), challenge, self._sign_in.passkey_login)

    async def ConsumeStepUpGrant(
        self, request: mfa_pb2.ConsumeStepUpGrantRequest, context: Ctx
    ) -> mfa_pb2.ConsumeStepUpGrantResponse:
        user_id, session_id = await self._step_up.consume(request.grant_token, request.action)
        return mfa_pb2.ConsumeStepUpGrantResponse(user_id=user_id, session_id=session_id)
