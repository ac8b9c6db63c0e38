"""Signup (behaviour.md 2.3), step by step, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import PASSWORD, client, failure, new_email, signup
from tests.conftest import Backend

NO_LIMITS = '{"signup.ip": {"windows": ["1000/1s"]}, "signup.pair": {"windows": ["1000/1s"]}}'


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": NO_LIMITS}
    async with running_service(tmp_path_factory.mktemp("signup"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


async def test_signup_creates_the_account_a_trusted_device_and_a_working_session(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """The answer is a Session whose access token verifies with the default role; the device is
    trusted with a baseline; the account stores the normalised address and an argon2id hash."""
    email = new_email().replace("user.", "Jane.Doe.").replace("example.com", "Example.COM")
    session = await signup(stub, email)
    async with iam.channel() as channel:
        verified = await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
        )
    assert (verified.user_id, list(verified.roles)) == (session.user_id, ["user"])
    await iam.app.components.audit.drain()
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(session.user_id)
        link = await tx.devices.get_link(session.user_id, session.device_id)
        events = [e.type for e in await tx.audit.recent(user_id=session.user_id)]
    assert user is not None
    assert user.email == email.split("@")[0] + "@example.com"
    assert user.email_norm == email.lower()
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in user.password_hash
    assert user.email_verified_at is None  # nothing proved the mailbox yet
    assert link is not None
    assert link.trusted_at is not None
    assert link.baseline["browser_family"] == "Firefox"
    assert {"user.signup", "session.created"} <= set(events)


async def test_every_invalid_field_is_reported_at_once(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """Bad email, short password, missing name, no consent: one INVALID_ARGUMENT listing all four."""
    code, details = await failure(
        stub.Signup(
            auth_pb2.SignupRequest(
                client=client(), email="not-an-email", password="short", name="", terms_accepted=False
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details.field_violations) == {"email", "password", "name", "terms_accepted"}


@pytest.mark.parametrize(
    ("field", "email", "password", "name"),
    [
        ("email", "a(b)@example.com", PASSWORD, "Ada"),
        ("email", "user@localhost", PASSWORD, "Ada"),
        ("email", "x" * 65 + "@example.com", PASSWORD, "Ada"),
        ("email", "mallory\n@example.com", PASSWORD, "Ada"),  # "$" once matched before a final \n
        ("email", "mallory\r\n@example.com", PASSWORD, "Ada"),
        ("password", "grace.hopper@example.com", "my grace.hopper secret", "Ada"),
        ("password", "ada@example.com", "x" * 129, "Ada"),
        ("password", "ada@example.com", "so Lovelace-ish here", "Ada"),
        ("name", "ada@example.com", PASSWORD, "Ada\u200bLovelace"),
        ("name", "ada@example.com", PASSWORD, "x" * 101),
    ],
)
async def test_input_rules_name_the_offending_field(
    stub: auth_pb2_grpc.AuthServiceStub, field: str, email: str, password: str, name: str
) -> None:
    """Each rule of behaviour.md 2.1 is a field violation of its own field (and nothing is created)."""
    code, details = await failure(signup(stub, email, password, name=name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.field_violations) == [field]


async def test_case_and_unicode_variants_of_an_address_are_one_account(
    stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    """Upper case and the Unicode spelling of a punycode domain collide: EMAIL_TAKEN."""
    local = new_email().split("@")[0]
    await signup(stub, f"{local}@xn--bcher-kva.example")
    for variant in (f"{local.upper()}@XN--BCHER-KVA.EXAMPLE", f"{local}@bücher.example"):
        code, details = await failure(signup(stub, variant))
        assert (code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")


async def test_a_taken_address_leaves_nothing_behind(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """The losing signup writes no device, session or audit row."""
    email = new_email()
    await signup(stub, email)
    async with iam.app.components.db.transaction() as tx:
        before = await tx.audit.recent(limit=10_000)
    code, _ = await failure(signup(stub, email, context=client(device_id="")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    async with iam.app.components.db.transaction() as tx:
        after = await tx.audit.recent(limit=10_000)
    assert len(after) == len(before)


async def test_concurrent_signups_of_one_address_create_one_account(
    stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    """Three parallel signups (signup.email allows three a day): one Session, two EMAIL_TAKEN."""
    email = new_email()
    results = await asyncio.gather(
        *(signup(stub, email, context=client(ip=f"203.0.113.{i}")) for i in range(3)), return_exceptions=True
    )
    sessions = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(sessions) == 1
    assert [e.code() for e in errors] == [grpc.StatusCode.ALREADY_EXISTS] * 2


async def test_common_passwords_are_refused_as_breached(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """A password from the bundled common list: PASSWORD_BREACHED, whatever its case."""
    code, details = await failure(signup(stub, password="Password1234"))
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PASSWORD_BREACHED")


async def test_disposable_domains_are_refused(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """mailinator.com and its subdomains: EMAIL_DOMAIN_REJECTED."""
    for email in ("someone@mailinator.com", "someone@eu.mailinator.com"):
        code, details = await failure(signup(stub, email))
        assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EMAIL_DOMAIN_REJECTED")


async def test_signup_limits_count_per_address_and_per_pair(backend: Backend, tmp_path: Path) -> None:
    """signup.email allows 3 per address a day; signup.pair refuses a repeat from one ip within a second."""
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": '{"signup.ip": {"windows": ["1000/1s"]}}'}
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        email = new_email()
        await signup(stub, email)
        code, details = await failure(signup(stub, email))
        assert (code, details.reason, details.metadata) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            {"scope": "ip_email"},
        )
        for i in range(2):
            code, details = await failure(signup(stub, email, context=client(ip=f"198.51.100.{i + 1}")))
            assert details.reason == "EMAIL_TAKEN"
        code, details = await failure(signup(stub, email, context=client(ip="198.51.100.9")))
        assert (details.reason, details.metadata) == ("RATE_LIMITED", {"scope": "email"})
