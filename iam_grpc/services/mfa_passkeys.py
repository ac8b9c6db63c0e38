"""The passkey RPCs of iam.v1.MfaService (a mixin of the servicer): decode, call the passkey
flows, encode; and the "passkey" channel of an MFA challenge."""

from __future__ import annotations

from iam_grpc.core.challenges import Challenge
from iam_grpc.core.passkey_login import PasskeyLogin
from iam_grpc.core.validation import Violations
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import common_pb2, mfa_pb2
from iam_grpc.services.convert import client_info, session_message, timestamp
from iam_grpc.storage.records import PasskeyRecord
from iam_grpc.wiring.signin import SignInMethods

__all__ = ["PasskeyRpcs", "offer_passkey"]


def passkey_message(record: PasskeyRecord) -> mfa_pb2.Passkey:
    message = mfa_pb2.Passkey(passkey_id=record.id, name=record.name, created_at=timestamp(record.created_at))
    if record.last_used_at is not None:
        message.last_used_at.CopyFrom(timestamp(record.last_used_at))
    return message


async def offer_passkey(
    message: common_pb2.MfaChallenge, challenge: Challenge, passkeys: PasskeyLogin
) -> common_pb2.MfaChallenge:
    """Add the "passkey" channel (preferred, before "email") and its request options when the
    challenge's user has a passkey."""
    options = await passkeys.offer(challenge)
    if options:
        channels = [c for c in (list(message.channels) or [message.channel]) if c and c != "passkey"]
        at = channels.index("email") if "email" in channels else len(channels)
        channels.insert(at, "passkey")
        del message.channels[:]
        message.channels.extend(channels)
        message.channel = channels[0]
        message.passkey_options_json = options
    return message


class PasskeyRpcs:
    """Mixed into MfaService, which sets ``_sign_in``."""

    _sign_in: SignInMethods

    async def StartPasskeyRegistration(
        self, request: mfa_pb2.StartPasskeyRegistrationRequest, context: Ctx
    ) -> mfa_pb2.StartPasskeyRegistrationResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        options = await self._sign_in.passkeys.start_registration(client, request.access_token)
        return mfa_pb2.StartPasskeyRegistrationResponse(options_json=options)

    async def FinishPasskeyRegistration(
        self, request: mfa_pb2.FinishPasskeyRegistrationRequest, context: Ctx
    ) -> mfa_pb2.FinishPasskeyRegistrationResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        record = await self._sign_in.passkeys.finish_registration(
            client, request.access_token, request.credential_json, request.name, violations
        )
        return mfa_pb2.FinishPasskeyRegistrationResponse(passkey=passkey_message(record))

    async def ListPasskeys(
        self, request: mfa_pb2.ListPasskeysRequest, context: Ctx
    ) -> mfa_pb2.ListPasskeysResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        records = await self._sign_in.passkeys.list(client, request.access_token)
        return mfa_pb2.ListPasskeysResponse(passkeys=[passkey_message(r) for r in records])

    async def DeletePasskey(
        self, request: mfa_pb2.DeletePasskeyRequest, context: Ctx
    ) -> mfa_pb2.DeletePasskeyResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        await self._sign_in.passkeys.delete(client, request.access_token, request.passkey_id, violations)
        return mfa_pb2.DeletePasskeyResponse()

    async def StartPasskeyLogin(
        self, request: mfa_pb2.StartPasskeyLoginRequest, context: Ctx
    ) -> mfa_pb2.StartPasskeyLoginResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        started = await self._sign_in.passkey_login.start(client, request.email, violations)
        return mfa_pb2.StartPasskeyLoginResponse(
            challenge_id=started.challenge_id, options_json=started.options_json
        )

    async def FinishPasskeyLogin(
        self, request: mfa_pb2.FinishPasskeyLoginRequest, context: Ctx
    ) -> mfa_pb2.FinishPasskeyLoginResponse:
        from iam_grpc.services.auth import challenge_message, note_user

        violations = Violations()
        client = client_info(request.client, violations)
        result = await self._sign_in.passkey_login.finish(
            client, request.challenge_id, request.credential_json, violations
        )
        if result.session is not None:
            note_user(result.session.user_id)
            return mfa_pb2.FinishPasskeyLoginResponse(session=session_message(result.session))
        assert result.challenge is not None
        note_user(result.challenge.user_id)
        # a challenge after a passkey: the risk checks want another channel than the passkey
        return mfa_pb2.FinishPasskeyLoginResponse(mfa=challenge_message(result.challenge))
