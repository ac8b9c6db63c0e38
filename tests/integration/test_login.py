"""Login (behaviour.md 2.4) on both backends: answers that reveal nothing, bounded failure
counting, the account guard, device trust and MFA, rehashing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.core.passwords import Argon2Params, PasswordHashing, StoredPassword
from iam_grpc.proto import auth_pb2, auth_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import (
    PASSWORD,
    account_env,
    client,
    code_of,
    failure,
    new_email,
    signup,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import IPHONE

GROUPS = {"login.pair": {"windows": ["5/1h fc"]}, "login.ip_fail": {"windows": ["1000/1h f"]}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = account_env(backend, mailbox, GROUPS)
    async with running_service(tmp_path_factory.mktemp("login"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def login(
    stub: auth_pb2_grpc.AuthServiceStub, email: str, password: str = PASSWORD, **context: str
) -> grpc.aio.UnaryUnaryCall[auth_pb2.LoginRequest, auth_pb2.LoginResponse]:
    """A login from a fresh address unless ``ip`` is given: failures elsewhere in the module must not
    raise this test's risk score."""
    context.setdefault("ip", f"198.18.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}")
    return stub.Login(auth_pb2.LoginRequest(client=client(**context), email=email, password=password))


async def test_the_signup_device_logs_in_without_a_challenge(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """Same device id and browser as at signup: a Session for the same user and device."""
    email = new_email()
    first = await signup(stub, email)
    answer = await login(stub, email.upper(), device_id=first.device_id)
    assert answer.WhichOneof("result") == "session"
    assert (answer.session.user_id, answer.session.device_id) == (first.user_id, first.device_id)
    assert answer.session.session_id != first.session_id
    assert answer.password_breached is False


async def test_unknown_email_wrong_password_and_disabled_account_answer_alike(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """Same code, reason and message for all three (S1), each after one argon2 verification."""
    email, disabled = new_email(), new_email()
    await signup(stub, email)
    gone = await signup(stub, disabled)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_status(gone.user_id, "disabled", iam.app.clock.now())
    before = iam.app.metrics.password_verifications._value.get()
    answers = [
        await failure(login(stub, new_email())),
        await failure(login(stub, email, "wrong password 123")),
        await failure(login(stub, disabled)),
    ]
    assert iam.app.metrics.password_verifications._value.get() - before == 3
    assert {(code, d.reason, d.message) for code, d in answers} == {
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS", "Wrong email or password.")
    }


async def test_failures_are_bounded_per_ip_and_address_and_a_success_resets_them(
    stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    """login.pair counts failures only: 4 failures, a success, 5 more failures, then RATE_LIMITED."""
    email, ip = new_email(), "192.0.2.150"
    first = await signup(stub, email)
    for _ in range(4):
        assert (await failure(login(stub, email, "not the password", ip=ip)))[
            1
        ].reason == "INVALID_CREDENTIALS"
    await login(stub, email, device_id=first.device_id, ip=ip)
    for _ in range(5):
        assert (await failure(login(stub, email, "not the password", ip=ip)))[
            1
        ].reason == "INVALID_CREDENTIALS"
    code, details = await failure(login(stub, email, device_id=first.device_id, ip=ip))
    assert (code, details.reason, details.metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"scope": "ip_email"},
    )
    assert details.retry_delay is not None
    assert details.retry_delay >= timedelta(seconds=1)


async def test_a_guarded_account_still_opens_for_its_trusted_device_only(
    stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    """After 10 failures from many ips the right password from an unknown device gets
    INVALID_CREDENTIALS (S3), while the owner's trusted device still signs in."""
    email = new_email()
    owner = await signup(stub, email)
    for i in range(11):
        await failure(login(stub, email, "guessing away 123", ip=f"192.0.2.{i + 1}"))
    code, details = await failure(login(stub, email, ip="192.0.2.200", ua=IPHONE))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    answer = await login(stub, email, ip="192.0.2.201", device_id=owner.device_id)
    assert answer.WhichOneof("result") == "session"


async def test_a_new_device_gets_an_email_challenge_and_a_repeat_gets_the_same_one(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """Unknown device on an account with a trusted device: MfaChallenge NEW_DEVICE, one code email
    whose subject holds no code; the same login again returns the same challenge, no second email."""
    email = new_email()
    await signup(stub, email)
    first = await login(stub, email, ua=IPHONE)
    assert first.WhichOneof("result") == "mfa"
    assert first.mfa.reason == "NEW_DEVICE"
    assert first.mfa.challenge_id.startswith("ch_")
    assert first.mfa.channel == "email"
    (message,) = await wait_for_mail(mailbox, email, "sign-in code")
    code = code_of(message)
    assert code not in str(message["Subject"])
    again = await login(stub, email, ua=IPHONE)
    assert again.mfa.challenge_id == first.mfa.challenge_id
    other_browser = await login(stub, email)  # the signup browser without its device id
    assert other_browser.mfa.challenge_id != first.mfa.challenge_id
    await wait_for_mail(mailbox, email, "sign-in code", count=2)
    assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 2


async def test_a_security_hold_challenges_even_the_trusted_device(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """While users.mfa_hold_until is ahead (after token reuse), every login needs MFA (S37)."""
    email = new_email()
    owner = await signup(stub, email)
    now = iam.app.clock.now()
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_mfa_hold(owner.user_id, now + timedelta(days=7), now)
    answer = await login(stub, email, device_id=owner.device_id)
    assert (answer.WhichOneof("result"), answer.mfa.reason) == ("mfa", "SECURITY_HOLD")


async def test_a_user_who_never_had_a_trusted_device_gets_one_without_mfa(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """An imported account (no trusted device yet) signs in and the device becomes trusted."""
    email = new_email()
    owner = await signup(stub, email)
    async with iam.app.components.db.transaction() as tx:
        link = await tx.devices.get_link(owner.user_id, owner.device_id)
        assert link is not None
        from dataclasses import replace

        await tx.devices.save_link(replace(link, trusted_at=None))
    answer = await login(stub, email, ua=IPHONE)
    assert answer.WhichOneof("result") == "session"
    async with iam.app.components.db.transaction() as tx:
        new_link = await tx.devices.get_link(owner.user_id, answer.session.device_id)
    assert new_link is not None
    assert new_link.trusted_at is not None


async def outdated_hashes(iam: RunningService, *passwords: str) -> list[StoredPassword]:
    """Hashes of ``passwords`` with other argon2 parameters (t=3) than the service's (t=2)."""
    older = PasswordHashing(
        Argon2Params(memory_kib=19456, time_cost=3, parallelism=1, hash_len=32, salt_len=16),
        iam.app.components.secrets.peppers,
        iam.app.components.secrets.current_pepper,
        max_concurrent=1,
        max_queued=1,
    )
    await older.start()
    try:
        return [await older.hash(password) for password in passwords]
    finally:
        await older.close()


async def test_outdated_hashes_are_replaced_at_the_next_login(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """A hash made with other argon2 parameters verifies and is rehashed with the current ones."""
    email = new_email()
    owner = await signup(stub, email)
    (stored,) = await outdated_hashes(iam, PASSWORD)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_password(owner.user_id, stored.phc, stored.pepper_id or 0, iam.app.clock.now())
    await login(stub, email, device_id=owner.device_id)
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(owner.user_id)
    assert user is not None
    assert user.password_hash is not None
    assert ",t=2," in user.password_hash


async def test_a_rehash_never_undoes_a_password_change_made_meanwhile(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """A login with an outdated hash verifies the old password; if a reset commits before its
    rehash is written, the rehash is dropped (only over the verified credential version), and the
    login itself still succeeds."""
    env = account_env(backend, mailbox, GROUPS, IAM_TEST_FAILPOINTS="1")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email()
        owner = await signup(stub, email)
        outdated, reset = await outdated_hashes(iam, PASSWORD, "a brand new secret phrase 77")
        async with iam.app.components.db.transaction() as tx:
            await tx.users.set_password(
                owner.user_id, outdated.phc, outdated.pepper_id or 0, iam.app.clock.now()
            )
        iam.app.failpoints.arm("login.before_rehash", "sleep:1")
        pending = asyncio.ensure_future(login(stub, email, device_id=owner.device_id))
        await asyncio.sleep(0.5)  # the login has verified the old password and waits before its rehash
        async with iam.app.components.db.transaction() as tx:  # a reset commits meanwhile
            await tx.users.set_password(owner.user_id, reset.phc, reset.pepper_id or 0, iam.app.clock.now())
        answer = await pending
        assert answer.WhichOneof("result") == "session"
        async with iam.app.components.db.transaction() as tx:
            user = await tx.users.get(owner.user_id)
        assert user is not None
        assert user.password_hash == reset.phc


async def test_a_breached_password_still_logs_in_with_an_advisory_flag(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """At Login a common password only sets password_breached."""
    email = new_email()
    owner = await signup(stub, email)
    stored = await iam.app.components.hashing.hash("Password1234")
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_password(owner.user_id, stored.phc, stored.pepper_id or 0, iam.app.clock.now())
    answer = await login(stub, email, "Password1234", device_id=owner.device_id)
    assert answer.WhichOneof("result") == "session"
    assert answer.password_breached is True


async def test_without_the_new_device_rule_a_new_device_gets_a_session_and_a_notice(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """login.mfa_on_new_device = false: Session, and a new-device notice to the account."""
    env = account_env(backend, mailbox, GROUPS, IAM_LOGIN__MFA_ON_NEW_DEVICE="false")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email()
        await signup(stub, email)
        answer = await login(stub, email, ua=IPHONE)
        assert answer.WhichOneof("result") == "session"
        await wait_for_mail(mailbox, email, "New sign-in")
