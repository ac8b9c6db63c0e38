"""Email verification: RequestEmailVerification's verify_email link, RedeemMagicLink of that
purpose, the signup mail, and the setting that holds back the first session until the address is
proven."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sqlalchemy import text

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, mfa_pb2, mfa_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import (
    PASSWORD,
    account_env,
    client,
    code_of,
    failure,
    link_token,
    new_email,
    signup,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.mailbox import Mailbox

SUBJECT = "Confirm your"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = account_env(backend, mailbox, {"login.pair": {"windows": ["1000/1h fc"]}})
    async with running_service(tmp_path_factory.mktemp("verify"), env) as running:
        yield running


async def verified_at(iam: RunningService, user_id: str) -> object:
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(user_id)
    assert user is not None
    return user.email_verified_at


async def test_the_link_verifies_the_address_once(iam: RunningService, mailbox: Mailbox) -> None:
    """RequestEmailVerification mails a verify_email link; InspectMagicLink says what it is;
    RedeemMagicLink answers purpose verify_email with no result and sets email_verified; a second
    redemption is LINK_USED; once verified, RequestEmailVerification sends nothing."""
    async with iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        context = client(device_id=session.device_id)
        assert mailbox.to(email) == []  # Signup sends nothing by default
        request = auth_pb2.RequestEmailVerificationRequest(client=context, access_token=session.access_token)
        await auth.RequestEmailVerification(request)
        [message] = await wait_for_mail(mailbox, email, SUBJECT)
        token = link_token(message)
        assert "/auth/verify-email?token=" in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        inspected = await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=token))
        assert (inspected.purpose, inspected.usable) == ("verify_email", True)
        assert await verified_at(iam, session.user_id) is None
        redeemed = await mfa.RedeemMagicLink(
            mfa_pb2.RedeemMagicLinkRequest(client=client(), link_token=token)
        )
        assert (redeemed.purpose, redeemed.WhichOneof("result")) == ("verify_email", None)
        assert await verified_at(iam, session.user_id) is not None
        status, details = await failure(
            mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=client(), link_token=token))
        )
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")
        inspected = await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=token))
        assert inspected.usable is False
        await auth.RequestEmailVerification(request)
        assert len([m for m in mailbox.to(email) if SUBJECT in str(m["Subject"])]) == 1


async def test_a_verification_link_does_not_work_for_another_purpose(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """A verify_email link at ResetPassword or ConfirmEmailChange is INVALID_ARGUMENT and stays usable."""
    async with iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        await auth.RequestEmailVerification(
            auth_pb2.RequestEmailVerificationRequest(
                client=client(device_id=session.device_id), access_token=session.access_token
            )
        )
        token = link_token((await wait_for_mail(mailbox, email, SUBJECT))[-1])
        status, details = await failure(
            auth.ResetPassword(
                auth_pb2.ResetPasswordRequest(
                    client=client(), link_token=token, new_password="a new long passphrase"
                )
            )
        )
        assert (status, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        status, _ = await failure(
            auth.ConfirmEmailChange(auth_pb2.ConfirmEmailChangeRequest(client=client(), link_token=token))
        )
        assert status == grpc.StatusCode.INVALID_ARGUMENT
        assert (await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=token))).usable


async def test_the_request_needs_the_tokens_own_device(iam: RunningService) -> None:
    """RequestEmailVerification from a context without the token's device id is TOKEN_INVALID."""
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        session = await signup(auth, new_email())
        status, details = await failure(
            auth.RequestEmailVerification(
                auth_pb2.RequestEmailVerificationRequest(client=client(), access_token=session.access_token)
            )
        )
        assert (status, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_signup_mails_the_link_when_configured(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """email_verification.on_signup: Signup answers its Session and mails the verify_email link."""
    env = account_env(backend, mailbox, IAM_EMAIL_VERIFICATION__ON_SIGNUP="true")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        assert session.access_token
        token = link_token((await wait_for_mail(mailbox, email, SUBJECT))[-1])
        await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=client(), link_token=token))
        assert await verified_at(iam, session.user_id) is not None


async def test_a_required_verification_holds_back_the_first_session(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """email_verification.required: Signup answers no Session and mails the link; Login answers an
    email-only challenge with reason EMAIL_UNVERIFIED, whose code opens the session and verifies
    the address; once verified (here by the link), Login answers a Session at once."""
    env = account_env(
        backend, mailbox, {"login.pair": {"windows": ["1000/1h fc"]}}, IAM_EMAIL_VERIFICATION__REQUIRED="true"
    )
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        answer = await auth.Signup(
            auth_pb2.SignupRequest(
                client=client(),
                email=email,
                password=PASSWORD,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            )
        )
        assert not answer.HasField("session")
        await wait_for_mail(mailbox, email, SUBJECT)
        login = await auth.Login(auth_pb2.LoginRequest(client=client(), email=email, password=PASSWORD))
        assert login.WhichOneof("result") == "mfa"
        assert (login.mfa.reason, list(login.mfa.channels)) == ("EMAIL_UNVERIFIED", ["email"])
        code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        passed = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(client=client(), challenge_id=login.mfa.challenge_id, code=code)
        )
        assert passed.WhichOneof("result") == "session"
        assert await verified_at(iam, passed.session.user_id) is not None

        other = new_email()
        await auth.Signup(
            auth_pb2.SignupRequest(
                client=client(),
                email=other,
                password=PASSWORD,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            )
        )
        token = link_token((await wait_for_mail(mailbox, other, SUBJECT))[-1])
        await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=client(), link_token=token))
        login = await auth.Login(auth_pb2.LoginRequest(client=client(), email=other, password=PASSWORD))
        assert login.WhichOneof("result") == "session"


async def test_a_link_to_the_old_address_dies_with_an_email_change(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """A verify_email link mailed to the old address before an email change is LINK_USED after it
    (as the old address's reset links are) and verifies nothing: whoever still reads the old mailbox cannot mark the new address as
    verified (the stored verification is cleared below to see that the link itself is dead)."""
    async with iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        old, new = new_email(), new_email()
        session = await signup(auth, old)
        context = client(device_id=session.device_id)
        await auth.RequestEmailVerification(
            auth_pb2.RequestEmailVerificationRequest(client=context, access_token=session.access_token)
        )
        stale = link_token((await wait_for_mail(mailbox, old, SUBJECT))[-1])
        await auth.RequestEmailChange(
            auth_pb2.RequestEmailChangeRequest(
                client=context, access_token=session.access_token, new_email=new
            )
        )
        confirmation = link_token((await wait_for_mail(mailbox, new, "Confirm your new"))[-1])
        await auth.ConfirmEmailChange(
            auth_pb2.ConfirmEmailChangeRequest(client=client(), link_token=confirmation)
        )
        async with iam.app.components.db.transaction() as tx:
            await tx.connection.execute(
                text("UPDATE users SET email_verified_at = NULL WHERE id = :id"), {"id": session.user_id}
            )
        assert not (await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=stale))).usable
        status, details = await failure(
            mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=client(), link_token=stale))
        )
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")
        assert await verified_at(iam, session.user_id) is None
