"""ChangePassword (behaviour.md 2.6) and RequestEmailChange / ConfirmEmailChange (2.7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import (
    PASSWORD,
    account_env,
    client,
    failure,
    link_token,
    new_email,
    signup,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.mailbox import Mailbox

NEW_PASSWORD = "a brand new passphrase 7"


def environment(backend: Backend, mailbox: Mailbox, **extra: str) -> dict[str, str]:
    groups = {"login.pair": {"windows": ["1000/1h fc"]}}
    return account_env(backend, mailbox, groups, IAM_RESET__RESPONSE_FLOOR="50ms", **extra)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("changes"), environment(backend, mailbox)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def change_password(
    stub: auth_pb2_grpc.AuthServiceStub,
    session: common_pb2.Session,
    current: str = PASSWORD,
    new: str = NEW_PASSWORD,
    device_id: str | None = None,
) -> grpc.aio.UnaryUnaryCall[auth_pb2.ChangePasswordRequest, auth_pb2.ChangePasswordResponse]:
    return stub.ChangePassword(
        auth_pb2.ChangePasswordRequest(
            client=client(device_id=session.device_id if device_id is None else device_id),
            access_token=session.access_token,
            current_password=current,
            new_password=new,
        )
    )


async def second_session(
    stub: auth_pb2_grpc.AuthServiceStub, email: str, first: common_pb2.Session
) -> common_pb2.Session:
    answer = await stub.Login(
        auth_pb2.LoginRequest(client=client(device_id=first.device_id), email=email, password=PASSWORD)
    )
    return answer.session


async def refresh_reason(iam: RunningService, session: common_pb2.Session) -> str:
    async with iam.channel() as channel:
        call = token_pb2_grpc.TokenServiceStub(channel).Refresh(
            token_pb2.RefreshRequest(
                client=client(device_id=session.device_id), refresh_token=session.refresh_token
            )
        )
        try:
            await call
        except grpc.aio.AioRpcError:
            return (await failure(call))[1].reason or ""
        return "OK"


# change password ---------------------------------------------------------------------


async def test_changing_the_password_ends_the_other_sessions_only(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """The current session lives on, the others are revoked, the new password works and a notice
    goes out."""
    email = new_email()
    current = await signup(stub, email)
    other = await second_session(stub, email, current)
    await change_password(stub, current)
    assert await refresh_reason(iam, other) == "SESSION_REVOKED"
    assert await refresh_reason(iam, current) == "OK"
    login = auth_pb2.LoginRequest(
        client=client(device_id=current.device_id), email=email, password=NEW_PASSWORD
    )
    assert (await stub.Login(login)).WhichOneof("result") == "session"
    await wait_for_mail(mailbox, email, "password was changed")


async def test_a_wrong_current_password_is_refused_and_counted(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """INVALID_CREDENTIALS five times, then RATE_LIMITED scoped to the user."""
    session = await signup(stub)
    for _ in range(5):
        code, details = await failure(change_password(stub, session, current="not my password"))
        assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    code, details = await failure(change_password(stub, session))
    assert (details.reason, details.metadata) == ("RATE_LIMITED", {"scope": "user"})


async def test_the_token_must_come_from_its_own_device(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """An access token next to another or no device id: TOKEN_INVALID (S25)."""
    session = await signup(stub)
    victim = await signup(stub)
    for device in ("", victim.device_id):
        code, details = await failure(change_password(stub, session, device_id=device))
        assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_the_new_password_must_pass_the_policy_and_differ(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """Same as the current one, too short, or common: refused, and the old password still works."""
    session = await signup(stub)
    for new, reason in (
        (PASSWORD, "INVALID_ARGUMENT"),
        ("short", "INVALID_ARGUMENT"),
        ("Password1234", "PASSWORD_BREACHED"),
    ):
        code, details = await failure(change_password(stub, session, new=new))
        assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    await change_password(stub, session)


# email change ------------------------------------------------------------------------------


def request_change(
    stub: auth_pb2_grpc.AuthServiceStub, session: common_pb2.Session, new_email_address: str
) -> grpc.aio.UnaryUnaryCall[auth_pb2.RequestEmailChangeRequest, auth_pb2.RequestEmailChangeResponse]:
    return stub.RequestEmailChange(
        auth_pb2.RequestEmailChangeRequest(
            client=client(device_id=session.device_id),
            access_token=session.access_token,
            new_email=new_email_address,
        )
    )


def confirm(
    stub: auth_pb2_grpc.AuthServiceStub, token: str
) -> grpc.aio.UnaryUnaryCall[auth_pb2.ConfirmEmailChangeRequest, auth_pb2.ConfirmEmailChangeResponse]:
    return stub.ConfirmEmailChange(auth_pb2.ConfirmEmailChangeRequest(client=client(), link_token=token))


async def test_an_email_change_is_confirmed_by_the_new_mailbox(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """A link to the new address, a notice to the old; confirming moves the account, verifies the
    address, ends the other sessions (not the requesting one) and tells the old address."""
    old, new = new_email(), new_email()
    current = await signup(stub, old)
    other = await second_session(stub, old, current)
    await request_change(stub, current, new)
    (confirmation,) = await wait_for_mail(mailbox, new, "Confirm your new")
    await wait_for_mail(mailbox, old, "about to change")
    await confirm(stub, link_token(confirmation))
    await wait_for_mail(mailbox, old, "was changed")
    assert await refresh_reason(iam, other) == "SESSION_REVOKED"
    assert await refresh_reason(iam, current) == "OK"
    login = auth_pb2.LoginRequest(client=client(device_id=current.device_id), email=new, password=PASSWORD)
    assert (await stub.Login(login)).WhichOneof("result") == "session"
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(current.user_id)
    assert user is not None
    assert (user.email_norm, user.email_verified_at is not None) == (new, True)
    code, details = await failure(confirm(stub, link_token(confirmation)))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")


async def test_an_email_change_ends_the_reset_links_sent_to_the_old_address(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """Whoever still reads the old mailbox (the reason to move, often) cannot use a reset link it
    received before the change: LINK_USED, and the password stays the same."""
    old, new = new_email(), new_email()
    current = await signup(stub, old)
    await stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(), email=old))
    (reset,) = await wait_for_mail(mailbox, old, "Reset your")
    await request_change(stub, current, new)
    (confirmation,) = await wait_for_mail(mailbox, new, "Confirm your new")
    await confirm(stub, link_token(confirmation))
    code, details = await failure(
        stub.ResetPassword(
            auth_pb2.ResetPasswordRequest(
                client=client(), link_token=link_token(reset), new_password=NEW_PASSWORD
            )
        )
    )
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")
    login = auth_pb2.LoginRequest(client=client(device_id=current.device_id), email=new, password=PASSWORD)
    assert (await stub.Login(login)).WhichOneof("result") == "session"


async def test_a_taken_address_gets_a_notice_and_the_same_answer(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """No link for an address that has an account: its owner is told instead; the caller sees OK."""
    taken = new_email()
    await signup(stub, taken)
    session = await signup(stub)
    await request_change(stub, session, taken.upper())
    await wait_for_mail(mailbox, taken, "tried to use your address")
    assert [m for m in mailbox.to(taken) if "Confirm your new" in str(m["Subject"])] == []


async def test_a_password_change_voids_a_pending_email_change(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """The 'not you? change your password' advice works: the link answers LINK_USED."""
    new = new_email()
    session = await signup(stub)
    await request_change(stub, session, new)
    (confirmation,) = await wait_for_mail(mailbox, new, "Confirm your new")
    await change_password(stub, session)
    assert (await failure(confirm(stub, link_token(confirmation))))[1].reason == "LINK_USED"


async def test_an_email_change_needs_a_recent_sign_in(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """auth_at older than email_change.max_auth_age: FAILED_PRECONDITION REAUTH_REQUIRED."""
    env = environment(backend, mailbox, IAM_EMAIL_CHANGE__MAX_AUTH_AGE="1s")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        session = await signup(stub)
        async with iam.app.components.db.transaction() as tx:
            await tx.sessions.set_auth(session.session_id, iam.app.clock.now() - timedelta(seconds=5))
        code, details = await failure(request_change(stub, session, new_email()))
        assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED")


async def test_the_same_or_a_disposable_address_is_refused(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """INVALID_ARGUMENT for the current address; EMAIL_DOMAIN_REJECTED for a disposable one."""
    email = new_email()
    session = await signup(stub, email)
    assert (await failure(request_change(stub, session, email.upper())))[1].reason == "INVALID_ARGUMENT"
    assert (await failure(request_change(stub, session, "me@mailinator.com")))[
        1
    ].reason == "EMAIL_DOMAIN_REJECTED"
