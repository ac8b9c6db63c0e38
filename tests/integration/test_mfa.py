"""Completing email challenges (behaviour.md 4, 5.4): codes, attempts, resends, magic links on the
same and on another device, InspectMagicLink, step-up grants."""

from __future__ import annotations

import asyncio
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
from iam_grpc.testing import RunningService, error_details, running_service
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
from tests.sessions_helper import IPHONE

# resend.challenge follows the module's resend interval (1 s instead of 60 s)
LIMITS = {
    "code.ip": {"windows": ["1000/1s"]},
    "login.pair": {"windows": ["1000/1h fc"]},
    "resend.challenge": {"windows": ["1000/1s"]},
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = account_env(backend, mailbox, LIMITS, IAM_MFA__RESEND_INTERVAL="1s")
    async with running_service(tmp_path_factory.mktemp("mfa"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stubs(
    iam: RunningService,
) -> AsyncIterator[tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub]]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)


PHONE = client(ip="203.0.113.77", ua=IPHONE)


async def new_device_login(
    auth: auth_pb2_grpc.AuthServiceStub,
    mailbox: Mailbox,
    email: str,
    context: common_pb2.ClientContext = PHONE,
) -> tuple[common_pb2.MfaChallenge, str, str]:
    """Sign up, then log in from another device: the challenge, its code and its link token."""
    await signup(auth, email)
    answer = await auth.Login(auth_pb2.LoginRequest(client=context, email=email, password=PASSWORD))
    assert answer.WhichOneof("result") == "mfa"
    messages = await wait_for_mail(mailbox, email, "sign-in code")
    return answer.mfa, code_of(messages[-1]), link_token(messages[-1])


def verify(
    mfa: mfa_pb2_grpc.MfaServiceStub, challenge_id: str, code: str, context: common_pb2.ClientContext = PHONE
) -> grpc.aio.UnaryUnaryCall[mfa_pb2.VerifyChallengeRequest, mfa_pb2.VerifyChallengeResponse]:
    return mfa.VerifyChallenge(
        mfa_pb2.VerifyChallengeRequest(client=context, challenge_id=challenge_id, code=code)
    )


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


async def test_the_right_code_on_the_challenge_device_opens_a_trusted_session(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """VerifyChallenge answers a Session; the device is trusted (the next login has no challenge),
    the mailbox counts as verified and a new-device notice goes out."""
    auth, mfa = stubs
    email = new_email()
    challenge, code, _ = await new_device_login(auth, mailbox, email)
    answer = await verify(mfa, challenge.challenge_id, code)
    assert answer.WhichOneof("result") == "session"
    again = await auth.Login(
        auth_pb2.LoginRequest(
            client=client(ip=PHONE.ip, ua=IPHONE, device_id=answer.session.device_id),
            email=email,
            password=PASSWORD,
        )
    )
    assert again.WhichOneof("result") == "session"
    await wait_for_mail(mailbox, email, "New sign-in")
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(answer.session.user_id)
    assert user is not None
    assert user.email_verified_at is not None
    code_again, details = await failure(verify(mfa, challenge.challenge_id, code))
    assert (code_again, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


async def test_wrong_codes_spend_attempts_and_the_last_one_ends_the_challenge(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """CODE_INVALID with attempts_left 4..0, then CHALLENGE_EXPIRED even for the right code."""
    auth, mfa = stubs
    challenge, code, _ = await new_device_login(auth, mailbox, new_email())
    for left in (4, 3, 2, 1, 0):
        status, details = await failure(verify(mfa, challenge.challenge_id, wrong(code)))
        assert (status, details.reason, details.metadata) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CODE_INVALID",
            {"attempts_left": str(left)},
        )
    assert (await failure(verify(mfa, challenge.challenge_id, code)))[1].reason == "CHALLENGE_EXPIRED"


async def test_the_right_code_from_another_device_counts_as_wrong(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """Whoever reads the code cannot use it elsewhere: CODE_INVALID, an attempt spent."""
    auth, mfa = stubs
    challenge, code, _ = await new_device_login(auth, mailbox, new_email())
    _status, details = await failure(verify(mfa, challenge.challenge_id, code, client(ip="198.51.100.3")))
    assert (details.reason, details.metadata) == ("CODE_INVALID", {"attempts_left": "4"})
    assert (await verify(mfa, challenge.challenge_id, code)).WhichOneof("result") == "session"


async def test_a_link_on_another_device_approves_and_the_original_login_collects(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """RedeemMagicLink elsewhere: purpose mfa, no result; the phone's repeated Login gets the Session."""
    auth, mfa = stubs
    email = new_email()
    _challenge, _, token = await new_device_login(auth, mailbox, email)
    approved = await mfa.RedeemMagicLink(
        mfa_pb2.RedeemMagicLinkRequest(client=client(ip="198.51.100.4"), link_token=token)
    )
    assert (approved.purpose, approved.WhichOneof("result")) == ("mfa", None)
    repeated = await auth.Login(auth_pb2.LoginRequest(client=PHONE, email=email, password=PASSWORD))
    assert repeated.WhichOneof("result") == "session"
    _status, details = await failure(
        mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
    )
    assert details.reason == "LINK_USED"  # its approval used it (5.3)


async def test_a_link_on_the_challenge_device_completes_it(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """Redeemed where the challenge was raised, a link is as good as the code: a Session."""
    auth, mfa = stubs
    _, _, token = await new_device_login(auth, mailbox, new_email())
    answer = await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
    assert (answer.purpose, answer.WhichOneof("result")) == ("mfa", "session")


async def test_inspecting_a_link_never_uses_it(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """20 inspections leave it usable; after redemption it reads as unusable; a forged one is
    unusable with no purpose; a shapeless one is INVALID_ARGUMENT."""
    auth, mfa = stubs
    _, _, token = await new_device_login(auth, mailbox, new_email())
    for _ in range(20):
        seen = await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=token))
        assert (seen.purpose, seen.usable) == ("mfa", True)
    await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
    assert (await mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=token))).usable is False
    head, body, signature = token.split(".")
    forged = await mfa.InspectMagicLink(
        mfa_pb2.InspectMagicLinkRequest(link_token=f"{head}.{body}.{signature[::-1]}")
    )
    assert (forged.purpose, forged.usable) == ("", False)
    status, _ = await failure(mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token="nonsense")))
    assert status == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_resend_replaces_the_code_without_restoring_attempts(
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub], mailbox: Mailbox
) -> None:
    """Too soon: RATE_LIMITED; later a new email whose code works while the old one does not, and
    the attempts already spent stay spent; from another device: CHALLENGE_EXPIRED."""
    auth, mfa = stubs
    email = new_email()
    challenge, old_code, _ = await new_device_login(auth, mailbox, email)
    resend = mfa_pb2.ResendChallengeRequest(client=PHONE, challenge_id=challenge.challenge_id)
    assert (await failure(mfa.ResendChallenge(resend)))[1].reason == "RATE_LIMITED"
    await failure(verify(mfa, challenge.challenge_id, wrong(old_code)))
    await asyncio.sleep(1.1)
    elsewhere = mfa_pb2.ResendChallengeRequest(
        client=client(ip="198.51.100.5"), challenge_id=challenge.challenge_id
    )
    assert (await failure(mfa.ResendChallenge(elsewhere)))[1].reason == "CHALLENGE_EXPIRED"
    renewed = await mfa.ResendChallenge(resend)
    assert renewed.challenge_id == challenge.challenge_id
    new_code = code_of((await wait_for_mail(mailbox, email, "sign-in code", count=2))[-1])
    if new_code != old_code:
        _status, details = await failure(verify(mfa, challenge.challenge_id, old_code))
        assert details.metadata == {"attempts_left": "3"}
    assert (await verify(mfa, challenge.challenge_id, new_code)).WhichOneof("result") == "session"


async def test_resends_are_limited_by_the_resend_challenge_group(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """8.3: ResendChallenge counts in resend.challenge (per challenge): with that group at one an
    hour, a second resend is RATE_LIMITED (scope challenge, RetryInfo of the group's window) while
    the challenge's own 1 s interval would allow it; other devices spend nothing of it."""
    groups = {**LIMITS, "resend.challenge": {"windows": ["1/1h"]}}
    env = account_env(backend, mailbox, groups, IAM_MFA__RESEND_INTERVAL="1s")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        challenge, _, _ = await new_device_login(auth, mailbox, new_email())
        await asyncio.sleep(1.1)
        elsewhere = mfa_pb2.ResendChallengeRequest(
            client=client(ip="198.51.100.5"), challenge_id=challenge.challenge_id
        )
        for _ in range(3):
            assert (await failure(mfa.ResendChallenge(elsewhere)))[1].reason == "CHALLENGE_EXPIRED"
        resend = mfa_pb2.ResendChallengeRequest(client=PHONE, challenge_id=challenge.challenge_id)
        assert (await mfa.ResendChallenge(resend)).challenge_id == challenge.challenge_id
        await asyncio.sleep(1.1)
        status, details = await failure(mfa.ResendChallenge(resend))
    assert (status, details.reason, details.metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"scope": "challenge"},
    )
    assert details.retry_delay is not None
    assert details.retry_delay.total_seconds() > 60


async def test_a_refresh_challenge_completed_by_code_rotates_and_moves_the_session(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """A refresh without the device cookie gets NEW_DEVICE; the code answers a Session on a new
    device, whose token refreshes normally, while the presented token is used up."""
    auth, mfa = stubs
    email = new_email()
    session = await signup(auth, email, context=client(ip="192.0.2.10"))
    laptop = client(ip="192.0.2.10")  # the same browser, cookie lost
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        raised = await tokens.Refresh(
            token_pb2.RefreshRequest(client=laptop, refresh_token=session.refresh_token)
        )
        assert (raised.WhichOneof("result"), raised.mfa.reason) == ("mfa", "NEW_DEVICE")
        again = await tokens.Refresh(
            token_pb2.RefreshRequest(client=laptop, refresh_token=session.refresh_token)
        )
        assert again.mfa.challenge_id == raised.mfa.challenge_id  # pending: the same, no new email
        code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        done = await verify(mfa, raised.mfa.challenge_id, code, laptop)
        assert done.session.session_id == session.session_id
        assert done.session.device_id != session.device_id
        moved = client(ip="192.0.2.10", device_id=done.session.device_id)
        after = await tokens.Refresh(
            token_pb2.RefreshRequest(client=moved, refresh_token=done.session.refresh_token)
        )
        assert after.WhichOneof("result") == "session"
    assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 1


async def test_a_lost_answer_to_a_refresh_challenge_can_be_retried_within_the_grace_window(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """VerifyChallenge of a refresh challenge rotates the presented token, so a lost answer must be
    recoverable like Refresh's (1.5): the same call again within refresh.grace answers the same
    Session (same refresh and access token); another device or another code gets
    CHALLENGE_EXPIRED; past the window CHALLENGE_EXPIRED, and nothing is revoked either way."""
    env = account_env(backend, mailbox, LIMITS, IAM_REFRESH_GRACE_SECONDS="2")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        email = new_email()
        session = await signup(auth, email, context=client(ip="192.0.2.10"))
        laptop = client(ip="192.0.2.10")  # the same browser, cookie lost: NEW_DEVICE
        raised = await tokens.Refresh(
            token_pb2.RefreshRequest(client=laptop, refresh_token=session.refresh_token)
        )
        code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        first = await verify(mfa, raised.mfa.challenge_id, code, laptop)
        again = await verify(mfa, raised.mfa.challenge_id, code, laptop)
        assert again.WhichOneof("result") == "session"
        assert (again.session.refresh_token, again.session.access_token) == (
            first.session.refresh_token,
            first.session.access_token,
        )
        for other_code, context in ((wrong(code), laptop), (code, client(ip="192.0.2.10", ua=IPHONE))):
            _status, details = await failure(verify(mfa, raised.mfa.challenge_id, other_code, context))
            assert details.reason == "CHALLENGE_EXPIRED"
        await asyncio.sleep(2.2)
        _status, late = await failure(verify(mfa, raised.mfa.challenge_id, code, laptop))
        assert late.reason == "CHALLENGE_EXPIRED"
        moved = client(ip="192.0.2.10", device_id=first.session.device_id)
        after = await tokens.Refresh(
            token_pb2.RefreshRequest(client=moved, refresh_token=first.session.refresh_token)
        )
        assert after.WhichOneof("result") == "session"
        async with iam.app.components.db.transaction(read_only=True) as tx:
            user = await tx.users.get(session.user_id)
            live = await tx.sessions.get(session.session_id)
        assert user is not None
        assert live is not None
        assert (user.mfa_hold_until, live.revoked_at) == (None, None)


async def test_an_exhausted_refresh_challenge_ends_the_session(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """Five wrong codes on a refresh challenge: the session is revoked and the account alerted (3.4)."""
    auth, mfa = stubs
    email = new_email()
    session = await signup(auth, email)
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        request = token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
        raised = await tokens.Refresh(request)
        code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        for _ in range(5):
            await failure(verify(mfa, raised.mfa.challenge_id, wrong(code), client()))
        assert (await failure(tokens.Refresh(request)))[1].reason == "SESSION_REVOKED"
    await wait_for_mail(mailbox, email, "Security alert")


async def test_step_up_grants_are_bound_to_their_action_and_used_once(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """StartStepUp → code → StepUpGrant; the same action returns the pending challenge; a wrong
    action leaves the grant alone; the right one answers user and session, once."""
    auth, mfa = stubs
    email = new_email()
    session = await signup(auth, email)
    here = client(device_id=session.device_id)
    start = mfa_pb2.StartStepUpRequest(
        client=here, access_token=session.access_token, action="delete-account"
    )
    challenge = await mfa.StartStepUp(start)
    assert (challenge.reason, (await mfa.StartStepUp(start)).challenge_id) == (
        "STEP_UP",
        challenge.challenge_id,
    )
    message = (await wait_for_mail(mailbox, email, "Confirm an action"))[-1]
    granted = await verify(mfa, challenge.challenge_id, code_of(message), here)
    grant = granted.grant
    assert (grant.action, grant.grant_token.startswith("iamg_")) == ("delete-account", True)
    consume = mfa.ConsumeStepUpGrant
    wrong_action = mfa_pb2.ConsumeStepUpGrantRequest(grant_token=grant.grant_token, action="export-data")
    status, details = await failure(consume(wrong_action))
    assert (status, list(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, ["action"])
    right = mfa_pb2.ConsumeStepUpGrantRequest(grant_token=grant.grant_token, action="delete-account")
    used = await consume(right)
    assert (used.user_id, used.session_id) == (session.user_id, session.session_id)
    assert (await failure(consume(right)))[1].reason == "CHALLENGE_EXPIRED"
    other = mfa_pb2.StartStepUpRequest(
        client=client(), access_token=session.access_token, action="delete-account"
    )
    assert (await failure(mfa.StartStepUp(other)))[1].reason == "TOKEN_INVALID"  # not the token's device


async def test_twenty_parallel_redemptions_on_two_replicas_have_one_winner(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """One link, 20 redemptions at once over two replicas: exactly one succeeds."""
    env = account_env(shared_backend, mailbox, {**LIMITS, "link_redeem.ip": {"windows": ["1000/1s"]}})
    async with (
        running_service(tmp_path / "a", env) as a,
        running_service(tmp_path / "b", env) as b,
        a.channel() as ca,
        b.channel() as cb,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(ca)
        replicas = [mfa_pb2_grpc.MfaServiceStub(ca), mfa_pb2_grpc.MfaServiceStub(cb)]
        _, _, token = await new_device_login(auth, mailbox, new_email())
        results = await asyncio.gather(
            *(
                replicas[i % 2].RedeemMagicLink(
                    mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token)
                )
                for i in range(20)
            ),
            return_exceptions=True,
        )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert winners[0].WhichOneof("result") == "session"
    assert len(losers) == 19
    assert {(e.code(), error_details(e).reason) for e in losers} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")
    }


@pytest.mark.parametrize(
    ("redeemer", "result"), [(PHONE, "session"), (client(ip="198.51.100.4"), None)], ids=["same", "other"]
)
async def test_two_redemptions_racing_on_one_device_give_one_answer_and_link_used(
    backend: Backend,
    mailbox: Mailbox,
    tmp_path: Path,
    redeemer: common_pb2.ClientContext,
    result: str | None,
) -> None:
    """S38: both redemptions pass every check before either moves the challenge on (a failpoint
    holds them there); the winner gets its answer (a Session on the challenge's device, an approval
    elsewhere) and the loser LINK_USED, not CHALLENGE_EXPIRED."""
    env = account_env(
        backend, mailbox, {**LIMITS, "link_redeem.ip": {"windows": ["1000/1s"]}}, IAM_TEST_FAILPOINTS="1"
    )
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        _, _, token = await new_device_login(auth, mailbox, new_email())
        iam.app.failpoints.arm("redeem.before_finish", "sleep:0.3")
        request = mfa_pb2.RedeemMagicLinkRequest(client=redeemer, link_token=token)
        outcomes = await asyncio.gather(
            mfa.RedeemMagicLink(request), mfa.RedeemMagicLink(request), return_exceptions=True
        )
    answers = [o for o in outcomes if isinstance(o, mfa_pb2.RedeemMagicLinkResponse)]
    refused = [error_details(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert [(a.purpose, a.WhichOneof("result")) for a in answers] == [("mfa", result)]
    assert [(d.code, d.reason) for d in refused] == [(grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED")]


async def test_attempts_are_shared_by_replicas(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Wrong codes alternating between two replicas: five in total, then CHALLENGE_EXPIRED."""
    env = account_env(shared_backend, mailbox, LIMITS)
    async with (
        running_service(tmp_path / "a", env) as a,
        running_service(tmp_path / "b", env) as b,
        a.channel() as ca,
        b.channel() as cb,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(ca)
        replicas = [mfa_pb2_grpc.MfaServiceStub(ca), mfa_pb2_grpc.MfaServiceStub(cb)]
        challenge, code, _ = await new_device_login(auth, mailbox, new_email())
        outcomes = await asyncio.gather(
            *(failure(verify(replicas[i % 2], challenge.challenge_id, wrong(code))) for i in range(8))
        )
        reasons = sorted(details.reason or "" for _, details in outcomes)
        assert reasons.count("CODE_INVALID") == 5
        assert reasons.count("CHALLENGE_EXPIRED") == 3
        assert (await failure(verify(replicas[1], challenge.challenge_id, code)))[
            1
        ].reason == "CHALLENGE_EXPIRED"


def test_codes_are_uniform_over_the_whole_range(iam: RunningService) -> None:
    """S42: 200,000 codes; a leading zero 10 % ± 0.5 % of the time, and the first digit passes a
    chi-square test (9 degrees of freedom, 0.1 % level: 27.88)."""
    codes = [iam.app.components.challenges._new_code() for _ in range(200_000)]
    assert all(len(code) == 6 and code.isdigit() for code in codes)
    counts = [0] * 10
    for code in codes:
        counts[int(code[0])] += 1
    assert abs(counts[0] / len(codes) - 0.10) <= 0.005
    expected = len(codes) / 10
    assert sum((c - expected) ** 2 / expected for c in counts) < 27.88


async def test_a_code_exists_in_clear_only_in_the_email_body(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """S42: not in the store's challenge record, not in the subject or headers, not in any log line."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(
        lambda message: lines.append(str(message) + str(message.record["extra"])), level="DEBUG"
    )
    try:
        auth, _ = stubs
        email = new_email()
        challenge, code, _ = await new_device_login(auth, mailbox, email)
    finally:
        logger.remove(sink)
    record = await iam.app.components.ephemeral.get(f"mfa:ch:{{{challenge.challenge_id}}}")
    assert record is not None
    assert code.encode() not in record
    (message,) = [m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]
    assert all(code not in str(value) for _, value in message.items())
    assert all(code not in line for line in lines)


async def test_one_session_has_one_pending_challenge(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """S45: five challenge-raising refreshes answer one challenge_id and send one email."""
    auth, _ = stubs
    email = new_email()
    session = await signup(auth, email)
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        request = token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
        ids = {(await tokens.Refresh(request)).mfa.challenge_id for _ in range(5)}
    assert len(ids) == 1
    await wait_for_mail(mailbox, email, "sign-in code")
    await asyncio.sleep(0.3)
    assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 1


async def test_a_refresh_approved_elsewhere_is_collected_by_the_same_refresh(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """S44: the link opened on a phone only approves; the laptop's repeated Refresh gets the Session."""
    auth, mfa = stubs
    email = new_email()
    session = await signup(auth, email)
    laptop = client()
    async with iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        request = token_pb2.RefreshRequest(client=laptop, refresh_token=session.refresh_token)
        raised = await tokens.Refresh(request)
        token = link_token((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        approved = await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
        assert (approved.purpose, approved.WhichOneof("result")) == ("mfa", None)
        collected = await tokens.Refresh(request)
    assert raised.WhichOneof("result") == "mfa"
    assert collected.WhichOneof("result") == "session"
    assert collected.session.session_id == session.session_id


async def test_a_reset_link_is_no_magic_link(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """S40: a password_reset link at RedeemMagicLink is INVALID_ARGUMENT, and it still resets after."""
    auth, mfa = stubs
    email = new_email()
    await signup(auth, email)
    await auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(), email=email))
    token = link_token((await wait_for_mail(mailbox, email, "Reset your"))[-1])
    status, details = await failure(
        mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
    )
    assert (status, list(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, ["link_token"])
    await auth.ResetPassword(
        auth_pb2.ResetPasswordRequest(
            client=client(), link_token=token, new_password="a brand new passphrase 7"
        )
    )


async def test_grants_expire_and_die_with_their_session(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """S46: a grant past step_up.grant_ttl is CHALLENGE_EXPIRED; one whose session was revoked is
    SESSION_REVOKED."""
    env = account_env(backend, mailbox, LIMITS, IAM_STEP_UP__GRANT_TTL="1s")
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        grants = []
        for _ in range(2):
            email = new_email()
            session = await signup(auth, email)
            here = client(device_id=session.device_id)
            challenge = await mfa.StartStepUp(
                mfa_pb2.StartStepUpRequest(client=here, access_token=session.access_token, action="export")
            )
            code = code_of((await wait_for_mail(mailbox, email, "Confirm an action"))[-1])
            grants.append(
                (session, (await verify(mfa, challenge.challenge_id, code, here)).grant.grant_token)
            )
        (_, late), (second, orphan) = grants
        await auth.Logout(auth_pb2.LogoutRequest(client=client(), refresh_token=second.refresh_token))
        consume = mfa.ConsumeStepUpGrant
        assert (
            await failure(consume(mfa_pb2.ConsumeStepUpGrantRequest(grant_token=orphan, action="export")))
        )[1].reason == "SESSION_REVOKED"
        await asyncio.sleep(1.2)
        assert (await failure(consume(mfa_pb2.ConsumeStepUpGrantRequest(grant_token=late, action="export"))))[
            1
        ].reason == "CHALLENGE_EXPIRED"


async def test_a_reauth_step_up_unlocks_an_email_change(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """S47: an old sign-in gets REAUTH_REQUIRED; after StartStepUp("reauth") and its code the same
    RequestEmailChange succeeds."""
    env = account_env(
        backend, mailbox, LIMITS, IAM_EMAIL_CHANGE__MAX_AUTH_AGE="1s", IAM_RESET__RESPONSE_FLOOR="10ms"
    )
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        auth, mfa = auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)
        email = new_email()
        session = await signup(auth, email)
        here = client(device_id=session.device_id)
        change = auth_pb2.RequestEmailChangeRequest(
            client=here, access_token=session.access_token, new_email=new_email()
        )
        await asyncio.sleep(1.2)
        assert (await failure(auth.RequestEmailChange(change)))[1].reason == "REAUTH_REQUIRED"
        challenge = await mfa.StartStepUp(
            mfa_pb2.StartStepUpRequest(client=here, access_token=session.access_token, action="reauth")
        )
        code = code_of((await wait_for_mail(mailbox, email, "Confirm an action"))[-1])
        await verify(mfa, challenge.challenge_id, code, here)
        await auth.RequestEmailChange(change)


async def test_revoking_a_session_ends_its_pending_challenges(
    iam: RunningService,
    stubs: tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub],
    mailbox: Mailbox,
) -> None:
    """behaviour.md 1.6: after Logout, the session's pending step-up challenge can neither be resent
    (no new email) nor completed with its code (CHALLENGE_EXPIRED) or its link (LINK_USED, 5.3)."""
    auth, mfa = stubs
    email = new_email()
    session = await signup(auth, email)
    here = client(device_id=session.device_id)
    challenge = await mfa.StartStepUp(
        mfa_pb2.StartStepUpRequest(client=here, access_token=session.access_token, action="export")
    )
    message = (await wait_for_mail(mailbox, email, "Confirm an action"))[-1]
    await auth.Logout(auth_pb2.LogoutRequest(client=here, refresh_token=session.refresh_token))
    await asyncio.sleep(1.1)  # past the resend interval: only the revocation can refuse it
    resend = mfa.ResendChallenge(
        mfa_pb2.ResendChallengeRequest(client=here, challenge_id=challenge.challenge_id)
    )
    assert (await failure(resend))[1].reason == "CHALLENGE_EXPIRED"
    assert (await failure(verify(mfa, challenge.challenge_id, code_of(message), here)))[1].reason == (
        "CHALLENGE_EXPIRED"
    )
    redeem = mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=here, link_token=link_token(message)))
    assert (await failure(redeem))[1].reason == "LINK_USED"  # a link of an ended challenge (5.3)
    await asyncio.sleep(0.5)
    assert len([m for m in mailbox.to(email) if "Confirm an action" in str(m["Subject"])]) == 1
