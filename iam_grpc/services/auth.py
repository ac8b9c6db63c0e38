"""iam.v1.AuthService: decode, call one core flow, encode."""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.core.call import current_call
from iam_grpc.core.challenges import Challenge
from iam_grpc.core.email_change import EmailChange
from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.login import LoginFlow
from iam_grpc.core.password_change import PasswordChange
from iam_grpc.core.password_reset import PasswordReset
from iam_grpc.core.signup import SignupFlow, SignupForm
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2
from iam_grpc.services.auth_federated import FederatedRpcs
from iam_grpc.services.auth_verification import EmailVerificationRpcs
from iam_grpc.services.convert import client_info, session_message, timestamp
from iam_grpc.services.mfa_passkeys import offer_passkey
from iam_grpc.wiring.signin import SignInMethods

__all__ = ["AuthFlows", "AuthService", "challenge_message", "note_user"]


@dataclass(frozen=True, slots=True)
class AuthFlows:
    signup: SignupFlow
    login: LoginFlow
    reset: PasswordReset
    password: PasswordChange
    email: EmailChange


def challenge_message(challenge: Challenge) -> common_pb2.MfaChallenge:
    return common_pb2.MfaChallenge(
        challenge_id=challenge.id,
        reason=challenge.reason,
        expires_at=timestamp(challenge.expires_at),
        channel=challenge.channels[0] if challenge.channels else "email",
        channels=challenge.channels,
    )


def note_user(user_id: str) -> None:
    call = current_call()
    if call is not None:
        call.user_id = user_id


class AuthService(FederatedRpcs, EmailVerificationRpcs, auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self, sessions: Sessions, flows: AuthFlows, sign_in: SignInMethods, verification: EmailVerification
    ) -> None:
        self._verification = verification
        self._sessions = sessions
        self._flows = flows
        self._sign_in = sign_in

    async def Signup(self, request: auth_pb2.SignupRequest, context: Ctx) -> auth_pb2.SignupResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        form = SignupForm(
            email=request.email,
            password=request.password,
            name=request.name,
            last_name=request.last_name,
            terms_accepted=request.terms_accepted,
        )
        issued = await self._flows.signup.signup(client, form, violations)
        if issued is None:  # email_verification.required: the address is proven before a session
            return auth_pb2.SignupResponse()
        note_user(issued.user_id)
        return auth_pb2.SignupResponse(session=session_message(issued))

    async def Login(self, request: auth_pb2.LoginRequest, context: Ctx) -> auth_pb2.LoginResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        result = await self._flows.login.login(client, request.email, request.password, violations)
        if result.session is not None:
            note_user(result.session.user_id)
            return auth_pb2.LoginResponse(
                session=session_message(result.session), password_breached=result.password_breached
            )
        assert result.challenge is not None
        note_user(result.challenge.user_id)
        mfa = await offer_passkey(
            challenge_message(result.challenge), result.challenge, self._sign_in.passkey_login
        )
        return auth_pb2.LoginResponse(mfa=mfa, password_breached=result.password_breached)

    async def Logout(self, request: auth_pb2.LogoutRequest, context: Ctx) -> auth_pb2.LogoutResponse:
        violations = Violations()
        client_info(request.client, violations)  # checked like every RPC's client, before storage
        violations.raise_any()
        await self._sessions.logout(request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def RequestPasswordReset(
        self, request: auth_pb2.RequestPasswordResetRequest, context: Ctx
    ) -> auth_pb2.RequestPasswordResetResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._flows.reset.request(client, request.email, violations)
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(
        self, request: auth_pb2.ResetPasswordRequest, context: Ctx
    ) -> auth_pb2.ResetPasswordResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._flows.reset.reset(client, request.link_token, request.new_password, violations)
        return auth_pb2.ResetPasswordResponse()

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: Ctx
    ) -> auth_pb2.ChangePasswordResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._flows.password.change(
            client, request.access_token, request.current_password, request.new_password, violations
        )
        return auth_pb2.ChangePasswordResponse()

    async def RequestEmailChange(
        self, request: auth_pb2.RequestEmailChangeRequest, context: Ctx
    ) -> auth_pb2.RequestEmailChangeResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._flows.email.request(client, request.access_token, request.new_email, violations)
        return auth_pb2.RequestEmailChangeResponse()

    async def ConfirmEmailChange(
        self, request: auth_pb2.ConfirmEmailChangeRequest, context: Ctx
    ) -> auth_pb2.ConfirmEmailChangeResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._flows.email.confirm(client, request.link_token, violations)
        return auth_pb2.ConfirmEmailChangeResponse()
