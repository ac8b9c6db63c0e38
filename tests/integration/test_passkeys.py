"""Passkeys (WebAuthn) through full ceremonies with a software authenticator: registration,
sign-in with and without an email, a passkey as the answer to an MFA challenge, and the attacks:
a registration or assertion replayed, a tampered signature, another origin or relying party, no
user verification, a ceremony's challenge used again on a second replica."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.proto import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import PASSWORD, account_env, client, failure, new_email, signup
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import IPHONE
from tests.webauthn_authenticator import SoftAuthenticator

LIMITS = {
    "code.ip": {"windows": ["1000/1s"]},
    "login.pair": {"windows": ["1000/1h fc"]},
    "passkey.ip": {"windows": ["1000/1s"]},
    "passkey.ip_fail": {"windows": ["1000/1h f"]},
}

Stubs = tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(
        tmp_path_factory.mktemp("passkeys"), account_env(backend, mailbox, LIMITS)
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stubs(iam: RunningService) -> AsyncIterator[Stubs]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)


def on_device(session: common_pb2.Session, ua: str | None = None) -> common_pb2.ClientContext:
    return client(device_id=session.device_id) if ua is None else client(ua=ua, device_id=session.device_id)


async def registered(mfa: mfa_pb2_grpc.MfaServiceStub, session: common_pb2.Session) -> SoftAuthenticator:
    """A passkey registered for the session's user."""
    authenticator = SoftAuthenticator()
    context = on_device(session)
    started = await mfa.StartPasskeyRegistration(
        mfa_pb2.StartPasskeyRegistrationRequest(client=context, access_token=session.access_token)
    )
    await mfa.FinishPasskeyRegistration(
        mfa_pb2.FinishPasskeyRegistrationRequest(
            client=context,
            access_token=session.access_token,
            credential_json=authenticator.create(started.options_json),
            name="Laptop",
        )
    )
    return authenticator


async def start_login(
    mfa: mfa_pb2_grpc.MfaServiceStub, email: str = "", context: common_pb2.ClientContext | None = None
) -> mfa_pb2.StartPasskeyLoginResponse:
    return await mfa.StartPasskeyLogin(
        mfa_pb2.StartPasskeyLoginRequest(client=context or client(), email=email)
    )


def finish_login(
    mfa: mfa_pb2_grpc.MfaServiceStub,
    challenge_id: str,
    credential_json: str,
    context: common_pb2.ClientContext | None = None,
) -> grpc.aio.UnaryUnaryCall[mfa_pb2.FinishPasskeyLoginRequest, mfa_pb2.FinishPasskeyLoginResponse]:
    return mfa.FinishPasskeyLogin(
        mfa_pb2.FinishPasskeyLoginRequest(
            client=context or client(), challenge_id=challenge_id, credential_json=credential_json
        )
    )


async def test_a_registered_passkey_signs_in_without_an_email(iam: RunningService, stubs: Stubs) -> None:
    """Register, list, then a discoverable sign-in (no email) from a new device answers a Session for
    that user; the signature counter and backup flags are stored."""
    auth, mfa = stubs
    session = await signup(auth)
    authenticator = await registered(mfa, session)
    listed = await mfa.ListPasskeys(
        mfa_pb2.ListPasskeysRequest(client=on_device(session), access_token=session.access_token)
    )
    assert [p.name for p in listed.passkeys] == ["Laptop"]
    started = await start_login(mfa, context=client(ua=IPHONE))
    assert json.loads(started.options_json)["allowCredentials"] == []
    assert json.loads(started.options_json)["userVerification"] == "required"
    answer = await finish_login(
        mfa, started.challenge_id, authenticator.get(started.options_json), client(ua=IPHONE)
    )
    assert answer.WhichOneof("result") == "session"
    assert answer.session.user_id == session.user_id
    async with iam.app.components.db.transaction() as tx:
        (stored,) = await tx.passkeys.of_user(session.user_id)
    assert (stored.sign_count, stored.backup_eligible, stored.backed_up) == (1, 1, 1)
    assert stored.last_used_at is not None


async def test_with_an_email_the_options_name_the_accounts_passkeys_and_decoys_otherwise(
    stubs: Stubs,
) -> None:
    """The options list the account's credential; an unknown address gets a made-up one, the same
    every time, so the answer does not tell whether the account exists."""
    auth, mfa = stubs
    email = new_email()
    authenticator = await registered(mfa, await signup(auth, email))
    named = json.loads((await start_login(mfa, email)).options_json)["allowCredentials"]
    assert [c["id"] for c in named] == [
        json.loads(authenticator.get(json.dumps({"challenge": "x", "rpId": "localhost"})))["id"]
    ]
    stranger = new_email()
    first = json.loads((await start_login(mfa, stranger)).options_json)["allowCredentials"]
    second = json.loads((await start_login(mfa, stranger)).options_json)["allowCredentials"]
    assert len(first) == 1
    assert first == second
    assert set(first[0]) == set(named[0])  # the same keys: no transports on either


async def test_a_registration_answer_works_once(stubs: Stubs) -> None:
    """The same credential JSON sent again: the ceremony's challenge is spent (CHALLENGE_EXPIRED)."""
    auth, mfa = stubs
    session = await signup(auth)
    context = on_device(session)
    started = await mfa.StartPasskeyRegistration(
        mfa_pb2.StartPasskeyRegistrationRequest(client=context, access_token=session.access_token)
    )
    credential = SoftAuthenticator().create(started.options_json)
    request = mfa_pb2.FinishPasskeyRegistrationRequest(
        client=context, access_token=session.access_token, credential_json=credential, name="Key"
    )
    await mfa.FinishPasskeyRegistration(request)
    code, details = await failure(mfa.FinishPasskeyRegistration(request))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


@pytest.mark.parametrize(
    ("origin", "rp_id", "uv"),
    [("https://evil.example", None, True), (None, "evil.example", True), (None, None, False)],
    ids=["wrong-origin", "wrong-rp-id", "no-user-verification"],
)
async def test_a_registration_for_another_origin_or_relying_party_does_not_verify(
    stubs: Stubs, origin: str | None, rp_id: str | None, uv: bool
) -> None:
    """INVALID_ARGUMENT, and nothing is stored."""
    auth, mfa = stubs
    session = await signup(auth)
    context = on_device(session)
    started = await mfa.StartPasskeyRegistration(
        mfa_pb2.StartPasskeyRegistrationRequest(client=context, access_token=session.access_token)
    )
    credential = SoftAuthenticator().create(started.options_json, origin=origin, rp_id=rp_id, uv=uv)
    code, details = await failure(
        mfa.FinishPasskeyRegistration(
            mfa_pb2.FinishPasskeyRegistrationRequest(
                client=context, access_token=session.access_token, credential_json=credential, name="Key"
            )
        )
    )
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    listed = await mfa.ListPasskeys(
        mfa_pb2.ListPasskeysRequest(client=context, access_token=session.access_token)
    )
    assert list(listed.passkeys) == []


async def test_an_assertion_replayed_is_refused(stubs: Stubs) -> None:
    """The same assertion again: on its own ceremony CHALLENGE_EXPIRED, on a new ceremony
    INVALID_CREDENTIALS (another challenge was signed)."""
    auth, mfa = stubs
    authenticator = await registered(mfa, await signup(auth))
    started = await start_login(mfa)
    assertion = authenticator.get(started.options_json)
    assert (await finish_login(mfa, started.challenge_id, assertion)).WhichOneof("result") == "session"
    code, details = await failure(finish_login(mfa, started.challenge_id, assertion))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")
    again = await start_login(mfa)
    code, details = await failure(finish_login(mfa, again.challenge_id, assertion))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


@pytest.mark.parametrize(
    "lie",
    [
        {"tamper": True},
        {"origin": "https://evil.example"},
        {"rp_id": "evil.example"},
        {"uv": False},
    ],
    ids=["tampered-signature", "wrong-origin", "wrong-rp-id", "no-user-verification"],
)
async def test_an_assertion_that_does_not_verify_is_invalid_credentials(
    stubs: Stubs, lie: dict[str, object]
) -> None:
    """INVALID_CREDENTIALS, and the ceremony is spent."""
    auth, mfa = stubs
    authenticator = await registered(mfa, await signup(auth))
    started = await start_login(mfa)
    code, details = await failure(
        finish_login(mfa, started.challenge_id, authenticator.get(started.options_json, **lie))  # type: ignore[arg-type]
    )
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    code, details = await failure(
        finish_login(mfa, started.challenge_id, authenticator.get(started.options_json))
    )
    assert details.reason == "CHALLENGE_EXPIRED"


async def test_another_accounts_passkey_does_not_answer_for_an_email(stubs: Stubs) -> None:
    """A ceremony started for one address, answered with another account's passkey."""
    auth, mfa = stubs
    email = new_email()
    await registered(mfa, await signup(auth, email))
    other = await registered(mfa, await signup(auth))
    started = await start_login(mfa, email)
    _, details = await failure(finish_login(mfa, started.challenge_id, other.get(started.options_json)))
    assert details.reason == "INVALID_CREDENTIALS"


async def test_a_passkey_answers_an_mfa_challenge(iam: RunningService, stubs: Stubs) -> None:
    """A password login from a new device: the challenge offers "passkey" first, with options; the
    assertion through VerifyChallenge answers a Session (the address is not thereby verified: a
    passkey proves the person, not the mailbox). A tampered one spends an attempt."""
    auth, mfa = stubs
    email = new_email()
    authenticator = await registered(mfa, await signup(auth, email))
    phone = client(ip="203.0.113.77", ua=IPHONE)
    answer = await auth.Login(auth_pb2.LoginRequest(client=phone, email=email, password=PASSWORD))
    assert answer.WhichOneof("result") == "mfa"
    assert list(answer.mfa.channels) == ["passkey", "email"]
    assert answer.mfa.channel == "passkey"
    options = answer.mfa.passkey_options_json
    bad = authenticator.get(options, tamper=True)
    _, details = await failure(
        mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=phone, challenge_id=answer.mfa.challenge_id, passkey_assertion_json=bad
            )
        )
    )
    assert (details.reason, details.metadata["attempts_left"]) == ("CODE_INVALID", "4")
    good = authenticator.get(options)
    verified = await mfa.VerifyChallenge(
        mfa_pb2.VerifyChallengeRequest(
            client=phone, challenge_id=answer.mfa.challenge_id, passkey_assertion_json=good
        )
    )
    assert verified.WhichOneof("result") == "session"
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(verified.session.user_id)
    assert user is not None
    assert user.email_verified_at is None
    _, details = await failure(
        mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=phone, challenge_id=answer.mfa.challenge_id, passkey_assertion_json=good
            )
        )
    )
    assert details.reason == "CHALLENGE_EXPIRED"


async def test_a_user_without_passkeys_is_offered_email_only(stubs: Stubs) -> None:
    auth, _ = stubs
    email = new_email()
    await signup(auth, email)
    answer = await auth.Login(
        auth_pb2.LoginRequest(client=client(ip="203.0.113.77", ua=IPHONE), email=email, password=PASSWORD)
    )
    assert answer.mfa.channel == "email"
    assert answer.mfa.passkey_options_json == ""


async def test_deleting_a_passkey_of_a_password_user(stubs: Stubs) -> None:
    """The password remains, so the passkey goes; someone else's id changes nothing."""
    auth, mfa = stubs
    session = await signup(auth)
    await registered(mfa, session)
    context = on_device(session)
    listed = await mfa.ListPasskeys(
        mfa_pb2.ListPasskeysRequest(client=context, access_token=session.access_token)
    )
    other = await signup(auth)
    await mfa.DeletePasskey(
        mfa_pb2.DeletePasskeyRequest(
            client=on_device(other), access_token=other.access_token, passkey_id=listed.passkeys[0].passkey_id
        )
    )
    still = await mfa.ListPasskeys(
        mfa_pb2.ListPasskeysRequest(client=context, access_token=session.access_token)
    )
    assert len(still.passkeys) == 1
    await mfa.DeletePasskey(
        mfa_pb2.DeletePasskeyRequest(
            client=context, access_token=session.access_token, passkey_id=listed.passkeys[0].passkey_id
        )
    )
    gone = await mfa.ListPasskeys(
        mfa_pb2.ListPasskeysRequest(client=context, access_token=session.access_token)
    )
    assert list(gone.passkeys) == []


async def test_a_login_ceremony_works_once_across_two_replicas(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Started on replica A, finished on B; the same answer to A again: CHALLENGE_EXPIRED (the
    challenge lives in the shared store and is taken once)."""
    environ = account_env(shared_backend, mailbox, LIMITS)
    async with (
        running_service(tmp_path / "a", environ) as a,
        running_service(tmp_path / "b", environ) as b,
        a.channel() as on_a,
        b.channel() as on_b,
    ):
        auth_a, mfa_a = auth_pb2_grpc.AuthServiceStub(on_a), mfa_pb2_grpc.MfaServiceStub(on_a)
        mfa_b = mfa_pb2_grpc.MfaServiceStub(on_b)
        authenticator = await registered(mfa_a, await signup(auth_a))
        started = await start_login(mfa_a)
        assertion = authenticator.get(started.options_json)
        answer = await finish_login(mfa_b, started.challenge_id, assertion)
        assert answer.WhichOneof("result") == "session"
        code, details = await failure(finish_login(mfa_a, started.challenge_id, assertion))
        assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_a_ceremony_is_finished_by_the_device_that_started_it(stubs: Stubs) -> None:
    """Started without a device id, finished with another one: INVALID_CREDENTIALS."""
    auth, mfa = stubs
    session = await signup(auth)
    authenticator = await registered(mfa, session)
    started = await start_login(mfa)
    _, details = await failure(
        finish_login(mfa, started.challenge_id, authenticator.get(started.options_json), on_device(session))
    )
    assert details.reason == "INVALID_CREDENTIALS"


async def test_a_refresh_challenge_offers_the_passkey_and_takes_it(iam: RunningService, stubs: Stubs) -> None:
    """Refresh from a changed browser raises a challenge that offers "passkey"; the assertion
    through VerifyChallenge rotates the session."""
    auth, mfa = stubs
    session = await signup(auth)
    authenticator = await registered(mfa, session)
    moved = client(ua=IPHONE, device_id=session.device_id)
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        answer = await tokens.Refresh(
            token_pb2.RefreshRequest(client=moved, refresh_token=session.refresh_token)
        )
    assert answer.WhichOneof("result") == "mfa"
    assert answer.mfa.channels[0] == "passkey"
    verified = await mfa.VerifyChallenge(
        mfa_pb2.VerifyChallengeRequest(
            client=moved,
            challenge_id=answer.mfa.challenge_id,
            passkey_assertion_json=authenticator.get(answer.mfa.passkey_options_json),
        )
    )
    assert verified.WhichOneof("result") == "session"
    assert verified.session.session_id == session.session_id
