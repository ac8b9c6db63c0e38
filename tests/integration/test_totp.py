"""TOTP as a second factor over gRPC: enrollment, recovery codes, challenges that accept an app
code once (on every replica), attempt limits, turning it off with a step-up grant, the secret
sealed at rest. The services run on a ManualClock; pyotp computes the app's codes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyotp
import pytest
import pytest_asyncio
from sqlalchemy import select

from iam_grpc.clock import ManualClock
from iam_grpc.proto import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from iam_grpc.storage.sql.tables import totp_factors, totp_recovery_codes
from iam_grpc.testing import RunningService, error_details, running_service
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
from tests.conftest import TEST_MASTER_KEY, TEST_PEPPER, Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX, IPHONE

LIMITS = {
    "code.ip": {"windows": ["1000/1s"]},
    "code.ip_fail": {"windows": ["1000/1h"]},
    "code.device": {"windows": ["1000/1h"]},
    "code.user_fail": {"windows": ["1000/24h"]},
    "login.pair": {"windows": ["1000/1h fc"]},
    "step_up.session": {"windows": ["1000/1h"]},
    "step_up.user": {"windows": ["1000/1h"]},
}


@dataclass
class Replicas:
    a: RunningService
    b: RunningService
    clock: ManualClock


def _environ(backend: Backend, mailbox: Mailbox, data: Path) -> dict[str, str]:
    env = account_env(backend, mailbox, LIMITS, IAM_MFA__TOTP_ISSUER="Example Co")
    if not backend.shared:  # two replicas on one SQLite file, with one master key, like production
        env |= {
            "IAM_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'iam.db'}",
            "IAM_SECRETS__MASTER_KEY": TEST_MASTER_KEY,
            "IAM_PASSWORDS__PEPPERS": '{"1": "' + TEST_PEPPER + '"}',
            "IAM_PASSWORDS__CURRENT_PEPPER": "1",
        }
    return env


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replicas]:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    data = tmp_path_factory.mktemp("totp")
    env = _environ(backend, mailbox, data)
    async with (
        running_service(data / "a", env, clock=clock) as a,
        running_service(data / "b", env, clock=clock) as b,
    ):
        yield Replicas(a, b, clock)


@dataclass
class Account:
    email: str
    context: common_pb2.ClientContext  # the signup device, which holds the session
    session: common_pb2.Session
    secret: str = ""
    recovery_codes: tuple[str, ...] = ()


PHONE_IP = "203.0.113.90"


def app_code(secret: str, clock: ManualClock, offset_steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(int(clock.now().timestamp()) + 30 * offset_steps)


def next_step(clock: ManualClock) -> None:
    """Move to the start of the next 30 s time-step."""
    clock.advance(30 - int(clock.now().timestamp()) % 30)


async def enrolled(replicas: Replicas) -> Account:
    """A new account with TOTP on, confirmed with the current code (its step is then used up)."""
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        context = client(device_id=session.device_id)
        started = await mfa.EnrollTotp(
            mfa_pb2.EnrollTotpRequest(client=context, access_token=session.access_token)
        )
        codes = await mfa.ConfirmTotp(
            mfa_pb2.ConfirmTotpRequest(
                client=context,
                access_token=session.access_token,
                enrollment_id=started.enrollment_id,
                code=app_code(started.secret_base32, replicas.clock),
            )
        )
    return Account(email, context, session, started.secret_base32, tuple(codes.recovery_codes))


async def phone_login(auth: auth_pb2_grpc.AuthServiceStub, account: Account) -> common_pb2.MfaChallenge:
    answer = await auth.Login(
        auth_pb2.LoginRequest(client=client(ip=PHONE_IP, ua=IPHONE), email=account.email, password=PASSWORD)
    )
    assert answer.WhichOneof("result") == "mfa"
    return answer.mfa


def verify(
    mfa: mfa_pb2_grpc.MfaServiceStub, challenge_id: str, *, code: str = "", recovery_code: str = ""
) -> grpc.aio.UnaryUnaryCall[mfa_pb2.VerifyChallengeRequest, mfa_pb2.VerifyChallengeResponse]:
    return mfa.VerifyChallenge(
        mfa_pb2.VerifyChallengeRequest(
            client=client(ip=PHONE_IP, ua=IPHONE),
            challenge_id=challenge_id,
            code=code,
            recovery_code=recovery_code,
        )
    )


async def test_enrollment_answers_a_secret_an_otpauth_uri_and_ten_recovery_codes(replicas: Replicas) -> None:
    """EnrollTotp gives the secret and a URI naming the configured issuer; ConfirmTotp with a wrong
    code is CODE_INVALID with attempts left, with the app's code it answers 10 distinct codes."""
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        context = client(device_id=session.device_id)
        started = await mfa.EnrollTotp(
            mfa_pb2.EnrollTotpRequest(client=context, access_token=session.access_token)
        )
        assert started.enrollment_id.startswith("te_")
        assert len(started.secret_base32) == 32
        parsed = pyotp.parse_uri(started.otpauth_uri)
        assert isinstance(parsed, pyotp.TOTP)
        assert (parsed.secret, parsed.issuer, parsed.name) == (started.secret_base32, "Example Co", email)

        def confirm(
            code: str,
        ) -> grpc.aio.UnaryUnaryCall[mfa_pb2.ConfirmTotpRequest, mfa_pb2.ConfirmTotpResponse]:
            return mfa.ConfirmTotp(
                mfa_pb2.ConfirmTotpRequest(
                    client=context,
                    access_token=session.access_token,
                    enrollment_id=started.enrollment_id,
                    code=code,
                )
            )

        right = app_code(started.secret_base32, replicas.clock)
        status, details = await failure(confirm(str((int(right) + 1) % 10**6).zfill(6)))
        assert (status, details.reason, details.metadata["attempts_left"]) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CODE_INVALID",
            "4",
        )
        codes = (await confirm(right)).recovery_codes
        assert len(codes) == 10
        assert len(set(codes)) == 10
        status, details = await failure(confirm(right))  # the enrollment is used up
        assert details.reason in ("TOTP_ALREADY_ENABLED", "CHALLENGE_EXPIRED")
        status, details = await failure(
            mfa.EnrollTotp(mfa_pb2.EnrollTotpRequest(client=context, access_token=session.access_token))
        )
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOTP_ALREADY_ENABLED")


async def test_a_challenge_lists_totp_first_and_takes_an_app_code_once(replicas: Replicas) -> None:
    """With TOTP on, a new-device login answers channels ["totp", "email"]; the code of the step
    used to confirm is refused (already used), the next step's code opens a session, and the same
    code again is refused for the next challenge. An app code proves no mailbox."""
    account = await enrolled(replicas)
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        challenge = await phone_login(auth, account)
        assert list(challenge.channels) == ["totp", "email"]
        assert challenge.channel == "totp"
        status, details = await failure(
            verify(mfa, challenge.challenge_id, code=app_code(account.secret, replicas.clock))
        )
        assert (status, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CODE_INVALID")
        next_step(replicas.clock)
        code = app_code(account.secret, replicas.clock)
        answer = await verify(mfa, challenge.challenge_id, code=code)
        assert answer.WhichOneof("result") == "session"
        again = await phone_login(auth, account)  # no device id: still a new device
        status, details = await failure(verify(mfa, again.challenge_id, code=code))
        assert (status, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CODE_INVALID")
    async with replicas.a.app.components.db.transaction() as tx:
        user = await tx.users.get(account.session.user_id)
    assert user is not None
    assert user.email_verified_at is None


async def test_a_used_app_code_is_refused_by_a_second_replica(replicas: Replicas) -> None:
    """Replica A accepts a code; replica B, on the same stores, refuses the same code for a
    challenge of its own: the used time-step is shared (SQL), not per process."""
    account = await enrolled(replicas)
    next_step(replicas.clock)
    code = app_code(account.secret, replicas.clock)
    async with replicas.a.channel() as on_a, replicas.b.channel() as on_b:
        first = await phone_login(auth_pb2_grpc.AuthServiceStub(on_a), account)
        answer = await verify(mfa_pb2_grpc.MfaServiceStub(on_a), first.challenge_id, code=code)
        assert answer.WhichOneof("result") == "session"
        second = await phone_login(auth_pb2_grpc.AuthServiceStub(on_b), account)
        status, details = await failure(
            verify(mfa_pb2_grpc.MfaServiceStub(on_b), second.challenge_id, code=code)
        )
        assert (status, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CODE_INVALID")


async def test_a_recovery_code_works_once_ever(replicas: Replicas) -> None:
    """A recovery code (in any case, with or without hyphens) completes a challenge; the same code
    is refused afterwards, on either replica; the others still work."""
    account = await enrolled(replicas)
    used, other = account.recovery_codes[0], account.recovery_codes[1]
    async with replicas.a.channel() as on_a, replicas.b.channel() as on_b:
        auth_a, mfa_a = auth_pb2_grpc.AuthServiceStub(on_a), mfa_pb2_grpc.MfaServiceStub(on_a)
        challenge = await phone_login(auth_a, account)
        answer = await verify(mfa_a, challenge.challenge_id, recovery_code=used.upper().replace("-", ""))
        assert answer.WhichOneof("result") == "session"
        again = await phone_login(auth_pb2_grpc.AuthServiceStub(on_b), account)
        status, details = await failure(
            verify(mfa_pb2_grpc.MfaServiceStub(on_b), again.challenge_id, recovery_code=used)
        )
        assert (status, details.reason, details.metadata["attempts_left"]) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CODE_INVALID",
            "4",
        )
        answer = await verify(mfa_pb2_grpc.MfaServiceStub(on_b), again.challenge_id, recovery_code=other)
        assert answer.WhichOneof("result") == "session"
    async with replicas.a.app.components.db.transaction() as tx:
        assert await tx.totp.recovery_codes_left(account.session.user_id) == 8


async def test_wrong_app_codes_spend_the_challenge_attempts(replicas: Replicas) -> None:
    """Wrong TOTP codes count like wrong email codes: attempts_left falls to 0, then the challenge
    is over even for the right code."""
    account = await enrolled(replicas)
    next_step(replicas.clock)
    right = app_code(account.secret, replicas.clock)
    wrong = str((int(right) + 500_000) % 10**6).zfill(6)
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        challenge = await phone_login(auth, account)
        left = []
        for _ in range(5):
            _, details = await failure(verify(mfa, challenge.challenge_id, code=wrong))
            left.append(details.metadata["attempts_left"])
        assert left == ["4", "3", "2", "1", "0"]
        status, details = await failure(verify(mfa, challenge.challenge_id, code=right))
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_malformed_answers_are_invalid_arguments(replicas: Replicas) -> None:
    """No answer, both a code and a recovery code, a recovery code of the wrong shape, and a
    recovery code for a challenge without the totp channel are INVALID_ARGUMENT."""
    account = await enrolled(replicas)
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        challenge = await phone_login(auth, account)
        for code, recovery in (
            ("", ""),
            ("123456", account.recovery_codes[0]),
            ("", "abc\n"),
            ("", "ä" * 12),
        ):
            status, details = await failure(
                verify(mfa, challenge.challenge_id, code=code, recovery_code=recovery)
            )
            assert (status, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        email = new_email()
        await signup(auth, email)
        plain = await auth.Login(
            auth_pb2.LoginRequest(client=client(ip=PHONE_IP, ua=IPHONE), email=email, password=PASSWORD)
        )
        assert list(plain.mfa.channels) == ["email"]
        status, details = await failure(
            verify(mfa, plain.mfa.challenge_id, recovery_code=account.recovery_codes[0])
        )
        assert (status, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_disabling_needs_a_grant_for_disable_totp_from_the_same_session(replicas: Replicas) -> None:
    """DisableTotp without a grant is INVALID_ARGUMENT, with an unknown one CHALLENGE_EXPIRED; a
    step-up for "disable-totp" passed with an app code yields the grant that turns TOTP off, after
    which challenges offer email only."""
    account = await enrolled(replicas)
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        token = account.session.access_token

        def disable(
            grant: str,
        ) -> grpc.aio.UnaryUnaryCall[mfa_pb2.DisableTotpRequest, mfa_pb2.DisableTotpResponse]:
            return mfa.DisableTotp(
                mfa_pb2.DisableTotpRequest(client=account.context, access_token=token, step_up_grant=grant)
            )

        status, details = await failure(disable(""))
        assert (status, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        status, details = await failure(disable("iamg_" + "A" * 43))
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")
        step_up = await mfa.StartStepUp(
            mfa_pb2.StartStepUpRequest(client=account.context, access_token=token, action="disable-totp")
        )
        assert list(step_up.channels) == ["totp", "email"]
        next_step(replicas.clock)
        passed = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=account.context,
                challenge_id=step_up.challenge_id,
                code=app_code(account.secret, replicas.clock),
            )
        )
        assert passed.grant.action == "disable-totp"
        await disable(passed.grant.grant_token)
        status, details = await failure(disable(passed.grant.grant_token))  # used up
        assert details.reason == "CHALLENGE_EXPIRED"
        challenge = await phone_login(auth, account)
        assert list(challenge.channels) == ["email"]
    async with replicas.a.app.components.db.transaction() as tx:
        assert await tx.totp.get(account.session.user_id) is None
        assert await tx.totp.recovery_codes_left(account.session.user_id) == 0


async def test_the_secret_and_recovery_codes_are_not_stored_in_clear(replicas: Replicas) -> None:
    """The factor's row holds the secret sealed (neither its base32 text nor its bytes appear), the
    recovery codes only as keyed hashes."""
    account = await enrolled(replicas)
    db = replicas.a.app.components.db
    async with db.transaction() as tx:
        row = (
            await tx.connection.execute(
                select(totp_factors).where(totp_factors.c.user_id == account.session.user_id)
            )
        ).one()
        hashes = [
            r.code_hash
            for r in await tx.connection.execute(
                select(totp_recovery_codes).where(totp_recovery_codes.c.user_id == account.session.user_id)
            )
        ]
    stored = bytes(row.secret_enc)
    assert account.secret.encode() not in stored
    assert account.secret.lower().encode() not in stored
    assert pyotp.TOTP(account.secret).byte_secret() not in stored
    assert len(hashes) == 10
    for code in account.recovery_codes:
        assert all(code.replace("-", "") not in h and code not in h for h in hashes)


async def test_confirming_someone_elses_or_an_unknown_enrollment_is_refused(replicas: Replicas) -> None:
    """An enrollment id of another user, or one never issued, is CHALLENGE_EXPIRED; a confirmation
    from a context whose device is not the token's is TOKEN_INVALID."""
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        owner = await signup(auth, new_email())
        thief = await signup(auth, new_email())
        started = await mfa.EnrollTotp(
            mfa_pb2.EnrollTotpRequest(
                client=client(device_id=owner.device_id), access_token=owner.access_token
            )
        )
        code = app_code(started.secret_base32, replicas.clock)
        for enrollment_id in (started.enrollment_id, "te_" + "A" * 22):
            status, details = await failure(
                mfa.ConfirmTotp(
                    mfa_pb2.ConfirmTotpRequest(
                        client=client(device_id=thief.device_id),
                        access_token=thief.access_token,
                        enrollment_id=enrollment_id,
                        code=code,
                    )
                )
            )
            assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")
        status, details = await failure(
            mfa.ConfirmTotp(
                mfa_pb2.ConfirmTotpRequest(
                    client=client(device_id=thief.device_id),
                    access_token=owner.access_token,
                    enrollment_id=started.enrollment_id,
                    code=code,
                )
            )
        )
        assert details.reason == "TOKEN_INVALID"


async def test_one_app_code_raced_on_two_replicas_completes_one_challenge(replicas: Replicas) -> None:
    """Two challenges of one user (an iPhone via replica A, a Firefox via replica B) answered at
    the same moment with the same app code: exactly one opens a session, the other is
    CODE_INVALID."""
    account = await enrolled(replicas)
    next_step(replicas.clock)
    code = app_code(account.secret, replicas.clock)
    firefox = client(ip=PHONE_IP, ua=FIREFOX)
    async with replicas.a.channel() as on_a, replicas.b.channel() as on_b:
        on_phone = await phone_login(auth_pb2_grpc.AuthServiceStub(on_a), account)
        on_laptop = await auth_pb2_grpc.AuthServiceStub(on_b).Login(
            auth_pb2.LoginRequest(client=firefox, email=account.email, password=PASSWORD)
        )
        assert on_laptop.WhichOneof("result") == "mfa"
        outcomes = await asyncio.gather(
            verify(mfa_pb2_grpc.MfaServiceStub(on_a), on_phone.challenge_id, code=code),
            mfa_pb2_grpc.MfaServiceStub(on_b).VerifyChallenge(
                mfa_pb2.VerifyChallengeRequest(
                    client=firefox, challenge_id=on_laptop.mfa.challenge_id, code=code
                )
            ),
            return_exceptions=True,
        )
    sessions = [o for o in outcomes if isinstance(o, mfa_pb2.VerifyChallengeResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(sessions) == 1
    assert len(refused) == 1
    assert error_details(refused[0]).reason == "CODE_INVALID"


async def test_with_email_off_for_totp_users_the_challenge_offers_the_app_only(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """mfa.email_with_totp = false: a TOTP user's challenge lists ["totp"], no code email is sent,
    ResendChallenge is INVALID_ARGUMENT, and an app code completes it."""
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    env = account_env(backend, mailbox, LIMITS, IAM_MFA__EMAIL_WITH_TOTP="false")
    async with running_service(tmp_path, env, clock=clock) as iam:
        replicas = Replicas(iam, iam, clock)
        account = await enrolled(replicas)
        async with iam.channel() as channel:
            auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
            challenge = await phone_login(auth, account)
            assert (list(challenge.channels), challenge.channel) == (["totp"], "totp")
            status, details = await failure(
                mfa.ResendChallenge(
                    mfa_pb2.ResendChallengeRequest(
                        client=client(ip=PHONE_IP, ua=IPHONE), challenge_id=challenge.challenge_id
                    )
                )
            )
            assert (status, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
            next_step(clock)
            answer = await verify(mfa, challenge.challenge_id, code=app_code(account.secret, clock))
            assert answer.WhichOneof("result") == "session"
        async with iam.app.components.db.transaction() as tx:  # queued or sent, the outbox row tells
            rows = await tx.outbox.list(limit=1000)
        assert [r for r in rows if r.user_id == account.session.user_id and r.kind == "mfa_code"] == []
        assert [r for r in rows if r.user_id == account.session.user_id]  # the query does see its mail


async def test_a_refresh_challenge_passed_with_an_app_code_can_be_retried_after_a_lost_answer(
    replicas: Replicas,
) -> None:
    """A Refresh from a new network is challenged; the app code completes it; VerifyChallenge
    repeated with the same code (its answer lost) gets the same Session back, though the code
    itself is used up; another code is CHALLENGE_EXPIRED."""
    account = await enrolled(replicas)
    elsewhere = client(ip="198.51.100.7", device_id=account.session.device_id)
    async with replicas.a.channel() as channel:
        refreshed = await token_pb2_grpc.TokenServiceStub(channel).Refresh(
            token_pb2.RefreshRequest(client=elsewhere, refresh_token=account.session.refresh_token)
        )
        assert refreshed.WhichOneof("result") == "mfa"
        assert list(refreshed.mfa.channels) == ["totp", "email"]
        next_step(replicas.clock)
        code = app_code(account.secret, replicas.clock)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        request = mfa_pb2.VerifyChallengeRequest(
            client=elsewhere, challenge_id=refreshed.mfa.challenge_id, code=code
        )
        first = await mfa.VerifyChallenge(request)
        again = await mfa.VerifyChallenge(request)
        assert again.session.refresh_token == first.session.refresh_token
        request.code = str((int(code) + 1) % 10**6).zfill(6)
        status, details = await failure(mfa.VerifyChallenge(request))
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_enrolling_needs_a_recent_sign_in(replicas: Replicas, mailbox: Mailbox) -> None:
    """16 minutes after sign-in (a refreshed access token is not a new sign-in) EnrollTotp is
    REAUTH_REQUIRED; a step-up "reauth" renews the sign-in and enrollment proceeds."""
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        context = client(device_id=session.device_id)
        replicas.clock.advance(timedelta(minutes=16))
        refreshed = await token_pb2_grpc.TokenServiceStub(channel).Refresh(
            token_pb2.RefreshRequest(client=context, refresh_token=session.refresh_token)
        )
        token = refreshed.session.access_token
        status, details = await failure(
            mfa.EnrollTotp(mfa_pb2.EnrollTotpRequest(client=context, access_token=token))
        )
        assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED")
        step_up = await mfa.StartStepUp(
            mfa_pb2.StartStepUpRequest(client=context, access_token=token, action="reauth")
        )
        [message] = await wait_for_mail(mailbox, email, "Confirm an action")
        await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=context, challenge_id=step_up.challenge_id, code=code_of(message)
            )
        )
        started = await mfa.EnrollTotp(mfa_pb2.EnrollTotpRequest(client=context, access_token=token))
        assert started.secret_base32


async def test_enrollments_are_limited_per_user(replicas: Replicas) -> None:
    """totp.user: the 11th EnrollTotp of a user within the hour is RATE_LIMITED (scope user)."""
    async with replicas.a.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        session = await signup(auth, new_email())
        request = mfa_pb2.EnrollTotpRequest(
            client=client(device_id=session.device_id), access_token=session.access_token
        )
        for _ in range(10):
            await mfa.EnrollTotp(request)
        status, details = await failure(mfa.EnrollTotp(request))
        assert (status, details.reason, details.metadata["scope"]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            "user",
        )
