"""The federated sign-in RPCs of iam.v1.AuthService (a mixin of the servicer): decode, call
:class:`~iam_grpc.core.federated.FederatedSignIn`, encode."""

from __future__ import annotations

from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import auth_pb2, common_pb2
from iam_grpc.services.convert import client_info, session_message, timestamp
from iam_grpc.services.mfa_passkeys import offer_passkey
from iam_grpc.storage.records import IdentityRecord
from iam_grpc.wiring.signin import SignInMethods

__all__ = ["FederatedRpcs", "identity_message"]


def identity_message(record: IdentityRecord) -> common_pb2.Identity:
    return common_pb2.Identity(
        provider=record.provider,
        subject=record.subject,
        email=record.email,
        linked_at=timestamp(record.linked_at),
    )


class FederatedRpcs:
    """Mixed into AuthService, which sets ``_sign_in``."""

    _sign_in: SignInMethods

    async def SignInWithIdToken(
        self, request: auth_pb2.SignInWithIdTokenRequest, context: Ctx
    ) -> auth_pb2.SignInWithIdTokenResponse:
        from iam_grpc.services.auth import challenge_message, note_user

        violations = Violations()
        client = client_info(request.client, violations)
        result = await self._sign_in.federated.sign_in(
            client, request.provider, request.id_token, request.nonce, violations
        )
        if result.session is not None:
            note_user(result.session.user_id)
            return auth_pb2.SignInWithIdTokenResponse(session=session_message(result.session))
        assert result.challenge is not None
        note_user(result.challenge.user_id)
        message = await offer_passkey(
            challenge_message(result.challenge), result.challenge, self._sign_in.passkey_login
        )
        return auth_pb2.SignInWithIdTokenResponse(mfa=message)

    async def LinkIdentity(
        self, request: auth_pb2.LinkIdentityRequest, context: Ctx
    ) -> auth_pb2.LinkIdentityResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        record = await self._sign_in.federated.link(
            client, request.access_token, request.provider, request.id_token, request.nonce, violations
        )
        return auth_pb2.LinkIdentityResponse(identity=identity_message(record))

    async def UnlinkIdentity(
        self, request: auth_pb2.UnlinkIdentityRequest, context: Ctx
    ) -> auth_pb2.UnlinkIdentityResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._sign_in.federated.unlink(client, request.access_token, request.provider, violations)
        return auth_pb2.UnlinkIdentityResponse()
