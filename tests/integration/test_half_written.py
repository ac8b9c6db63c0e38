"""With the database failing, RPCs fail clearly and nothing is half-written (security.md S59;
behaviour.md 2.3-2.7, 11.5).

A failpoint just before COMMIT of each multi-row transaction (signup, login, reset, password
change, email change; rotation is S33 in test_tokens.py) makes the database fail there: the call
answers UNAVAILABLE BACKEND_UNAVAILABLE well within its deadline, the account reads exactly as
before (user row, live sessions each with a live refresh token, audit trail), and the same call
succeeds once the failpoint is disarmed. Health is driven against a MariaDB reached through a TCP
proxy the test cuts and restores, so the shared server never stops.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.storage.records import User
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import (
    NO_BURSTS,
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
from tests.tcp_proxy import TcpProxy, tcp_proxy

NEW_PASSWORD = "a brand new passphrase 7"
DEADLINE = 5.0  # seconds, the deadline of every call that meets the failing database
LOGIN_RETRIES = {"login.pair": {"windows": ["1000/1h fc"]}}  # the retried logins of a test


def environment(backend: Backend, mailbox: Mailbox) -> dict[str, str]:
    return account_env(
        backend, mailbox, LOGIN_RETRIES, IAM_RESET__RESPONSE_FLOOR="50ms", IAM_TEST_FAILPOINTS="1"
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("half"), environment(backend, mailbox)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


# what the database holds ------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """An account as stored: its row, its live sessions, its audit trail (event types, newest first)."""

    user: User | None
    live: frozenset[str]
    audit: tuple[str, ...]


async def account(iam: RunningService, user_id: str) -> Account:
    """The stored account; every live session must hold a live refresh token (no session without
    its token)."""
    async with iam.app.components.db.transaction(read_only=True) as tx:
        user = await tx.users.get(user_id)
        live = await tx.sessions.list_live(user_id, iam.app.clock.now())
        for session in live:
            states = [token.state for token in await tx.sessions.tokens_of(session.id)]
            assert "active" in states, f"session {session.id} has no live refresh token: {states}"
        events = await tx.audit.recent(user_id=user_id)
    return Account(user, frozenset(s.id for s in live), tuple(e.type for e in events))


async def fails_clearly(iam: RunningService, failpoint: str, call: Callable[[], Awaitable[object]]) -> None:
    """With ``failpoint`` failing the database, the call answers UNAVAILABLE BACKEND_UNAVAILABLE
    before its deadline."""
    iam.app.failpoints.arm(failpoint, "unavailable")
    try:
        started = time.monotonic()
        code, details = await failure(call())
        took = time.monotonic() - started
    finally:
        iam.app.failpoints.disarm(failpoint)
    assert (code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    assert took < DEADLINE


async def refreshes(iam: RunningService, session: common_pb2.Session) -> str:
    """ "OK" when the session's refresh token still rotates, else the refusal's reason."""
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


def login(
    stub: auth_pb2_grpc.AuthServiceStub, email: str, device_id: str, password: str = PASSWORD
) -> grpc.aio.UnaryUnaryCall[auth_pb2.LoginRequest, auth_pb2.LoginResponse]:
    return stub.Login(
        auth_pb2.LoginRequest(client=client(device_id=device_id), email=email, password=password),
        timeout=DEADLINE,
    )


async def second_session(
    stub: auth_pb2_grpc.AuthServiceStub, email: str, first: common_pb2.Session
) -> common_pb2.Session:
    answer = await login(stub, email, first.device_id)
    assert answer.WhichOneof("result") == "session"
    return answer.session


# the flows ---------------------------------------------------------------------------------


async def signup_flow(iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox) -> None:
    """Signup: no user is left without its session; the same address then signs up."""
    email = new_email()
    request = auth_pb2.SignupRequest(
        client=client(), email=email, password=PASSWORD, name="Ada", last_name="Lovelace", terms_accepted=True
    )
    await fails_clearly(iam, "signup.before_commit", lambda: stub.Signup(request, timeout=DEADLINE))
    async with iam.app.components.db.transaction(read_only=True) as tx:
        assert await tx.users.get_by_email(email) is None
    session = (await stub.Signup(request, timeout=DEADLINE)).session
    after = await account(iam, session.user_id)
    assert after.live == {session.session_id}
    assert after.audit.count("user.signup") == 1


async def login_flow(iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox) -> None:
    """Login: no extra session, no session without its token, no login recorded; then it logs in."""
    email = new_email()
    first = await signup(stub, email)
    before = await account(iam, first.user_id)
    await fails_clearly(iam, "login.before_commit", lambda: login(stub, email, first.device_id))
    assert await account(iam, first.user_id) == before
    second = await second_session(stub, email, first)
    after = await account(iam, first.user_id)
    assert after.live == {first.session_id, second.session_id}
    assert after.audit.count("login.success") == 1


async def reset_flow(iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox) -> None:
    """ResetPassword: the old password still works, the sessions live on and the link stays usable;
    used again, it resets and ends every session."""
    email = new_email()
    session = await signup(stub, email)
    await stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(), email=email))
    (message,) = await wait_for_mail(mailbox, email, "Reset your")
    request = auth_pb2.ResetPasswordRequest(
        client=client(), link_token=link_token(message), new_password=NEW_PASSWORD
    )
    before = await account(iam, session.user_id)
    await fails_clearly(iam, "reset.before_commit", lambda: stub.ResetPassword(request, timeout=DEADLINE))
    assert await account(iam, session.user_id) == before
    assert await refreshes(iam, session) == "OK"
    assert (await login(stub, email, session.device_id)).WhichOneof("result") == "session"
    await stub.ResetPassword(request, timeout=DEADLINE)
    after = await account(iam, session.user_id)
    assert after.live == set()
    assert after.audit.count("password.reset") == 1
    assert (await login(stub, email, session.device_id, NEW_PASSWORD)).WhichOneof("result") == "session"
    await wait_for_mail(mailbox, email, "password was changed")
    await asyncio.sleep(0.5)
    assert len([m for m in mailbox.to(email) if "password was changed" in str(m["Subject"])]) == 1


async def password_change_flow(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """ChangePassword: no password change without its revocations; the old password works and the
    other session lives on; then the change goes through and ends that session."""
    email = new_email()
    current = await signup(stub, email)
    other = await second_session(stub, email, current)
    request = auth_pb2.ChangePasswordRequest(
        client=client(device_id=current.device_id),
        access_token=current.access_token,
        current_password=PASSWORD,
        new_password=NEW_PASSWORD,
    )
    before = await account(iam, current.user_id)
    await fails_clearly(
        iam, "password_change.before_commit", lambda: stub.ChangePassword(request, timeout=DEADLINE)
    )
    assert await account(iam, current.user_id) == before
    assert await refreshes(iam, other) == "OK"
    assert (await login(stub, email, current.device_id)).WhichOneof("result") == "session"
    await stub.ChangePassword(request, timeout=DEADLINE)
    after = await account(iam, current.user_id)
    assert after.live == {current.session_id}
    assert after.audit.count("password.changed") == 1
    await wait_for_mail(mailbox, email, "password was changed")
    await asyncio.sleep(0.5)
    assert len([m for m in mailbox.to(email) if "password was changed" in str(m["Subject"])]) == 1


async def email_change_flow(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """ConfirmEmailChange: the address is unchanged and no session ended; the same link then
    moves the account."""
    old, new = new_email(), new_email()
    current = await signup(stub, old)
    other = await second_session(stub, old, current)
    await stub.RequestEmailChange(
        auth_pb2.RequestEmailChangeRequest(
            client=client(device_id=current.device_id), access_token=current.access_token, new_email=new
        )
    )
    (confirmation,) = await wait_for_mail(mailbox, new, "Confirm your new")
    request = auth_pb2.ConfirmEmailChangeRequest(client=client(), link_token=link_token(confirmation))
    before = await account(iam, current.user_id)
    await fails_clearly(
        iam, "email_change.before_commit", lambda: stub.ConfirmEmailChange(request, timeout=DEADLINE)
    )
    assert await account(iam, current.user_id) == before
    assert before.user is not None
    assert before.user.email_norm == old
    assert await refreshes(iam, other) == "OK"
    await stub.ConfirmEmailChange(request, timeout=DEADLINE)
    after = await account(iam, current.user_id)
    assert after.user is not None
    assert after.user.email_norm == new
    assert after.live == {current.session_id}
    assert after.audit.count("email.changed") == 1


FLOWS = {
    "signup": signup_flow,
    "login": login_flow,
    "reset": reset_flow,
    "password_change": password_change_flow,
    "email_change": email_change_flow,
}


@pytest.mark.parametrize("flow", list(FLOWS))
async def test_a_database_failure_before_commit_leaves_nothing_half_written(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox, flow: str
) -> None:
    """S59: UNAVAILABLE BACKEND_UNAVAILABLE within the deadline, the account exactly as before (no
    user without a session, no session without a token, no password change without its
    revocations), and the same call succeeds after the database recovers."""
    await FLOWS[flow](iam, stub, mailbox)


# MySQL down: health ------------------------------------------------------------------------


@pytest.fixture
def mariadb_link(shared_backend: Backend) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the test database's server, and the database URL through it."""
    url = make_url(shared_backend.environ["IAM_DATABASE_URL"])
    with tcp_proxy(url.host or "127.0.0.1", url.port or 3306) as proxy:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


async def health_of(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(answer.status)


async def test_mysql_down_fails_calls_clearly_and_health_follows(
    shared_backend: Backend, mariadb_link: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """S59: with MySQL unreachable a Login answers UNAVAILABLE BACKEND_UNAVAILABLE within its
    deadline; two failed probes change nothing, the third turns health NOT_SERVING, and one
    probe after MySQL returns brings SERVING back, with the calls working again."""
    forwarder, database_url = mariadb_link
    env = {
        **shared_backend.isolated(),
        "IAM_DATABASE_URL": database_url,
        "IAM_RATELIMIT__GROUPS": json.dumps({**NO_BURSTS, **LOGIN_RETRIES}),
    }
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with running_service(tmp_path, env, probe_interval=3600) as running, running.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email()
        session = await signup(stub, email)
        assert await health_of(running.address) == serving

        forwarder.cut()
        started = time.monotonic()
        code, details = await failure(login(stub, email, session.device_id))
        assert (code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
        assert time.monotonic() - started < DEADLINE
        for _ in range(2):
            await running.app.readiness.probe_once()
            assert await health_of(running.address) == serving
        await running.app.readiness.probe_once()
        assert await health_of(running.address) == not_serving

        forwarder.restore()
        await running.app.readiness.probe_once()
        assert await health_of(running.address) == serving
        assert (await login(stub, email, session.device_id)).WhichOneof("result") == "session"
