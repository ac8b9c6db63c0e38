"""RequestPasswordReset and ResetPassword (behaviour.md 2.5) on both backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
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
FLOOR = 0.3


def environment(backend: Backend, mailbox: Mailbox, **extra: str) -> dict[str, str]:
    groups = {"login.pair": {"windows": ["1000/1h fc"]}}
    return account_env(backend, mailbox, groups, IAM_RESET__RESPONSE_FLOOR=f"{int(FLOOR * 1000)}ms", **extra)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("reset"), environment(backend, mailbox)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


async def request_reset(stub: auth_pb2_grpc.AuthServiceStub, email: str) -> float:
    started = time.monotonic()
    await stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(), email=email))
    return time.monotonic() - started


def reset(
    stub: auth_pb2_grpc.AuthServiceStub, token: str, password: str = NEW_PASSWORD
) -> grpc.aio.UnaryUnaryCall[auth_pb2.ResetPasswordRequest, auth_pb2.ResetPasswordResponse]:
    return stub.ResetPassword(
        auth_pb2.ResetPasswordRequest(client=client(), link_token=token, new_password=password)
    )


async def reset_link(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox, email: str, count: int = 1
) -> str:
    await request_reset(stub, email)
    messages = await wait_for_mail(mailbox, email, "Reset your", count=count)
    return link_token(messages[-1])


async def test_known_and_unknown_addresses_get_the_same_answer_after_the_floor(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """OK for both, each after at least reset.response_floor; only the account holder gets mail."""
    known, unknown = new_email(), new_email()
    await signup(stub, known)
    times = [await request_reset(stub, known), await request_reset(stub, unknown)]
    assert min(times) >= FLOOR
    assert max(times) - min(times) < 0.15
    await wait_for_mail(mailbox, known, "Reset your")
    await asyncio.sleep(0.3)
    assert mailbox.to(unknown) == []


async def test_a_reset_link_sets_the_password_once_and_ends_every_session(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """The new password works, the old does not, every session is revoked, the mailbox counts as
    verified, a notice goes out, and the same link then answers LINK_USED."""
    email = new_email()
    session = await signup(stub, email)
    token = await reset_link(stub, mailbox, email)
    await reset(stub, token)
    login = auth_pb2.LoginRequest(
        client=client(device_id=session.device_id), email=email, password=NEW_PASSWORD
    )
    assert (await stub.Login(login)).WhichOneof("result") == "session"
    old = auth_pb2.LoginRequest(client=client(device_id=session.device_id), email=email, password=PASSWORD)
    assert (await failure(stub.Login(old)))[1].reason == "INVALID_CREDENTIALS"
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        refresh = tokens.Refresh(
            token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
        )
        assert (await failure(refresh))[1].reason == "SESSION_REVOKED"
    code, details = await failure(reset(stub, token, "yet another passphrase 9"))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")
    await wait_for_mail(mailbox, email, "password was changed")
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(session.user_id)
    assert user is not None
    assert user.email_verified_at is not None


async def test_a_used_mark_lost_from_the_store_does_not_revive_a_link(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """credential_version in SQL keeps the link single-use (S38); older links die with it."""
    email = new_email()
    await signup(stub, email)
    older = await reset_link(stub, mailbox, email)
    newer = await reset_link(stub, mailbox, email, count=2)
    await reset(stub, newer)
    claims = iam.app.components.links.read(newer)
    await iam.app.components.ephemeral.delete(f"link:used:{{{claims.jti}}}")
    for token in (newer, older):
        assert (await failure(reset(stub, token, "yet another passphrase 9")))[1].reason == "LINK_USED"


async def test_policy_and_breach_failures_do_not_consume_the_link(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """A short or common new password is refused; the same link then works."""
    email = new_email()
    await signup(stub, email)
    token = await reset_link(stub, mailbox, email)
    code, details = await failure(reset(stub, token, "short"))
    assert (code, list(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, ["new_password"])
    assert (await failure(reset(stub, token, "Password1234")))[1].reason == "PASSWORD_BREACHED"
    await reset(stub, token)


async def test_forged_foreign_and_expired_links_are_refused(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Tampered or shapeless tokens and an access token: INVALID_ARGUMENT on link_token; an expired
    link: CHALLENGE_EXPIRED."""
    env = environment(backend, mailbox, IAM_LINKS__PASSWORD_RESET_TTL="1s")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email()
        session = await signup(stub, email)
        token = await reset_link(stub, mailbox, email)
        head, body, signature = token.split(".")
        for bad in (f"{head}.{body}.{signature[::-1]}", "not.a.link", session.access_token, "x" * 3000):
            code, details = await failure(reset(stub, bad))
            assert (code, list(details.field_violations)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                ["link_token"],
            )
        await asyncio.sleep(1.2)
        code, details = await failure(reset(stub, token))
        assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_reset_requests_per_address_are_silently_capped(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """reset_request.email: the 4th request within the hour answers OK and sends nothing."""
    email = new_email()
    await signup(stub, email)
    for _ in range(4):
        await request_reset(stub, email)
    await wait_for_mail(mailbox, email, "Reset your", count=3)
    await asyncio.sleep(0.5)
    assert len([m for m in mailbox.to(email) if "Reset your" in str(m["Subject"])]) == 3


async def test_two_resets_racing_on_two_replicas_succeed_once(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """One link, two replicas, at once: one OK and one LINK_USED."""
    env = environment(shared_backend, mailbox)
    async with (
        running_service(tmp_path / "a", env) as a,
        running_service(tmp_path / "b", env) as b,
        a.channel() as ca,
        b.channel() as cb,
    ):
        first, second = auth_pb2_grpc.AuthServiceStub(ca), auth_pb2_grpc.AuthServiceStub(cb)
        email = new_email()
        await signup(first, email)
        token = await reset_link(first, mailbox, email)
        results = await asyncio.gather(reset(first, token), reset(second, token), return_exceptions=True)
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errors) == 1
        assert errors[0].code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_reset_lifts_the_account_guard(stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox) -> None:
    """After a reset, the new password works even from a new device of a guarded account (no guard
    answer: the challenge of a new device instead)."""
    email = new_email()
    await signup(stub, email)
    for i in range(11):
        request = auth_pb2.LoginRequest(
            client=client(ip=f"192.0.2.{i + 1}"), email=email, password="guessing 1234"
        )
        await failure(stub.Login(request))
    await reset(stub, await reset_link(stub, mailbox, email))
    answer = await stub.Login(
        auth_pb2.LoginRequest(client=client(ua="curl/8.0"), email=email, password=NEW_PASSWORD)
    )
    assert answer.WhichOneof("result") == "mfa"
