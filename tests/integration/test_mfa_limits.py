"""The limits of one email challenge (behaviour.md 4.1-4.3): five wrong codes in all, however many
replicas take them at once; ten minutes per code; resends that renew the code but neither the
attempts nor the challenge's thirty-minute lifetime."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from iam_grpc.clock import ManualClock
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, mfa_pb2, mfa_pb2_grpc
from iam_grpc.testing import running_service
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

PHONE = client(ip="203.0.113.77", ua=IPHONE)
TTL = timedelta(minutes=10)  # mfa.ttl
MAX_LIFETIME = timedelta(minutes=30)  # mfa.max_lifetime
RESEND_INTERVAL = timedelta(seconds=60)  # mfa.resend_interval
MAX_RESENDS = 3  # mfa.max_resends


async def new_device_login(
    auth: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox, email: str
) -> tuple[common_pb2.MfaChallenge, str]:
    """Sign up, then log in from the phone (a new device): the challenge and its emailed code."""
    await signup(auth, email)
    answer = await auth.Login(auth_pb2.LoginRequest(client=PHONE, email=email, password=PASSWORD))
    assert answer.WhichOneof("result") == "mfa"
    messages = await wait_for_mail(mailbox, email, "sign-in code")
    return answer.mfa, code_of(messages[-1])


def verify(
    mfa: mfa_pb2_grpc.MfaServiceStub,
    challenge_id: str,
    code: str,
    context: common_pb2.ClientContext = PHONE,
) -> grpc.aio.UnaryUnaryCall[mfa_pb2.VerifyChallengeRequest, mfa_pb2.VerifyChallengeResponse]:
    return mfa.VerifyChallenge(
        mfa_pb2.VerifyChallengeRequest(client=context, challenge_id=challenge_id, code=code)
    )


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


async def test_ten_parallel_wrong_codes_over_two_replicas_spend_exactly_five_attempts(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """S14: 10 wrong codes at once from the challenge's device (its browser, no device id) but 10
    different ips, alternating between two replicas on one Redis: exactly five CODE_INVALID with
    attempts_left 4, 3, 2, 1 and 0 once each, CHALLENGE_EXPIRED for the other five, and the right
    code afterwards is CHALLENGE_EXPIRED too. The limiter groups are the defaults (one call per
    ip, ten per device and user stay within code.ip, code.ip_fail, code.device, code.user_fail)."""
    env = account_env(shared_backend, mailbox)  # one environment: both replicas share the prefix
    async with (
        running_service(tmp_path / "a", env) as a,
        running_service(tmp_path / "b", env) as b,
        a.channel() as ca,
        b.channel() as cb,
    ):
        challenge, code = await new_device_login(auth_pb2_grpc.AuthServiceStub(ca), mailbox, new_email())
        replicas = [mfa_pb2_grpc.MfaServiceStub(ca), mfa_pb2_grpc.MfaServiceStub(cb)]
        outcomes = await asyncio.gather(
            *(
                failure(
                    verify(
                        replicas[i % 2],
                        challenge.challenge_id,
                        wrong(code),
                        client(ip=f"198.51.100.{20 + i}", ua=IPHONE),
                    )
                )
                for i in range(10)
            )
        )
        after = await failure(verify(replicas[1], challenge.challenge_id, code))
    invalid = [details for status, details in outcomes if details.reason == "CODE_INVALID"]
    expired = [(status, details) for status, details in outcomes if details.reason == "CHALLENGE_EXPIRED"]
    assert len(invalid) + len(expired) == 10, [(s.name, d.reason) for s, d in outcomes]
    assert sorted(d.metadata["attempts_left"] for d in invalid) == ["0", "1", "2", "3", "4"]
    assert all(s == grpc.StatusCode.UNAUTHENTICATED for s, d in outcomes if d.reason == "CODE_INVALID")
    assert {s for s, _ in expired} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert len(expired) == 5
    assert (after[0], after[1].reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


# S43: clock-driven, unit-level tests. The real server runs in this process on the embedded
# backends (SQLite and the in-process store) with an injected ManualClock, which the challenge
# records, their expiry, the store's key lifetimes and the limiter all read; only the mail goes
# out in real time (the outbox poller), so each test waits for an email before moving the clock.


def _clocked_env(mailbox: Mailbox) -> dict[str, str]:
    return account_env(Backend("sqlite+memory"), mailbox, {"code.ip": {"windows": ["1000/1s"]}})


def _start() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


async def test_a_code_expires_ten_minutes_after_the_challenge(mailbox: Mailbox, tmp_path: Path) -> None:
    """S43 (clock-driven unit test): the challenge's expires_at is created + 10 min; a second
    before it the challenge is live (a wrong code spends an attempt), a second after it the right
    code is CHALLENGE_EXPIRED."""
    clock = _start()
    async with running_service(tmp_path, _clocked_env(mailbox), clock=clock) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        created = clock.now()
        challenge, code = await new_device_login(auth, mailbox, new_email())
        assert challenge.expires_at.ToDatetime(UTC) == created + TTL
        clock.advance(TTL - timedelta(seconds=1))
        live = await failure(verify(mfa, challenge.challenge_id, wrong(code)))
        assert (live[1].reason, live[1].metadata) == ("CODE_INVALID", {"attempts_left": "4"})
        clock.advance(timedelta(seconds=2))  # created + ttl + 1 s
        status, details = await failure(verify(mfa, challenge.challenge_id, code))
    assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_resends_renew_the_code_but_not_the_attempts_nor_the_lifetime(
    mailbox: Mailbox, tmp_path: Path
) -> None:
    """S43 (clock-driven unit test): each resend moves expires_at to now + 10 min, capped at
    created + 30 min; the previous code stops working and counts as a wrong attempt, and the
    attempts spent before a resend stay spent; a resend within 60 s of the last email, and a
    fourth resend, are RATE_LIMITED; past created + 30 min the latest code is CHALLENGE_EXPIRED."""
    clock = _start()
    async with running_service(tmp_path, _clocked_env(mailbox), clock=clock) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        created = clock.now()
        challenge, code = await new_device_login(auth, mailbox, email)
        cid = challenge.challenge_id
        resend = mfa_pb2.ResendChallengeRequest(client=PHONE, challenge_id=cid)
        spent = await failure(verify(mfa, cid, wrong(code)))
        assert spent[1].metadata == {"attempts_left": "4"}

        clock.advance(RESEND_INTERVAL - timedelta(seconds=1))
        too_soon = await failure(mfa.ResendChallenge(resend))
        assert (too_soon[0], too_soon[1].reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")

        # (moment of the resend, the expiry it must give): now + 10 min twice, then the cap
        plan = [
            (timedelta(minutes=9), timedelta(minutes=19)),
            (timedelta(minutes=18), timedelta(minutes=28)),
            (timedelta(minutes=27), MAX_LIFETIME),
        ]
        attempts_left = 4
        for sent, (moment, expiry) in enumerate(plan, start=2):
            clock.advance(created + moment - clock.now())
            renewed = await mfa.ResendChallenge(resend)
            assert (renewed.challenge_id, renewed.expires_at.ToDatetime(UTC)) == (cid, created + expiry)
            messages = await wait_for_mail(mailbox, email, "sign-in code", count=sent)
            previous, code = code, code_of(messages[-1])
            # The old code after the first and the last resend (five attempts in all: keep two for
            # the end); 1 in a million the two codes coincide and the old one is the new one.
            if sent in (2, 1 + MAX_RESENDS) and previous != code:
                attempts_left -= 1
                old = await failure(verify(mfa, cid, previous))
                assert (old[1].reason, old[1].metadata) == (
                    "CODE_INVALID",
                    {"attempts_left": str(attempts_left)},
                )
        assert attempts_left >= 2  # one for the check below, one so that nothing but time ends it

        clock.advance(RESEND_INTERVAL + timedelta(seconds=30))  # created + 28 min 30 s
        exhausted = await failure(mfa.ResendChallenge(resend))
        assert (exhausted[0], exhausted[1].reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 1 + MAX_RESENDS

        clock.advance(created + MAX_LIFETIME - timedelta(seconds=1) - clock.now())
        live = await failure(verify(mfa, cid, wrong(code)))
        assert (live[1].reason, live[1].metadata) == (
            "CODE_INVALID",
            {"attempts_left": str(attempts_left - 1)},
        )
        clock.advance(timedelta(seconds=2))  # created + 30 min + 1 s
        status, details = await failure(verify(mfa, cid, code))
    assert (status, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")
