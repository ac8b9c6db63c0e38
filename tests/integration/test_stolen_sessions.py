"""A thief with copies of what the owner's browser holds (the refresh token, the device id from the
``did`` claim, even the password): an approval on the owner's phone, an empty or stripped
User-Agent, a cleanup run and a step-up must not hand the thief what the owner's mailbox guards
(behaviour.md 1.5, 1.7, 1.8, 3.4, 4.1, 4.5; security.md S30, S44, S45)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

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
from tests.sessions_helper import FIREFOX, IPHONE, NO_ANOMALY_CHECKS, new_session

CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
# Firefox's User-Agent with the browser token cut off: the OS and device type still match.
STRIPPED = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101"
HOME, HOME_2 = "203.0.113.10", "203.0.113.11"  # the owner's /24
THIEF_IP = "192.0.2.66"
PHONE = client(ip="198.51.100.7", ua=IPHONE)
LIMITS = {
    "refresh.ip": {"windows": ["1000/1s"]},
    "refresh.token": {"windows": ["1000/1m"]},
    "login.ip": {"windows": ["1000/1s"]},
    "login.ip_fail": {"windows": ["10000/1h f"]},
    "login.pair": {"windows": ["1000/1s", "1000/1h fc"]},
    "code.ip": {"windows": ["1000/1s"]},
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = account_env(backend, mailbox, LIMITS)
    async with running_service(tmp_path_factory.mktemp("stolen"), env) as running:
        yield running


async def refresh(
    tokens: token_pb2_grpc.TokenServiceStub, context: common_pb2.ClientContext, token: str
) -> token_pb2.RefreshResponse:
    return await tokens.Refresh(token_pb2.RefreshRequest(client=context, refresh_token=token))


def did_of(access_token: str) -> str:
    """The device id any holder of an access token reads from its ``did`` claim (no key needed)."""
    payload = access_token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["did"])


async def trusted_devices(iam: RunningService, user_id: str) -> set[str]:
    now = iam.app.clock.now()
    async with iam.app.components.db.transaction() as tx:
        links = await tx.devices.links_of(user_id)
    return {
        link.device_id
        for link in links
        if link.trusted_at is not None
        and (link.trust_revoked_at is None or link.trust_revoked_at < link.trusted_at)
        and link.last_seen_at + iam.app.components.sessions.trust_idle > now
    }


# an approval goes where the challenge was raised ------------------------------------------------


async def test_an_approval_on_the_phone_is_collected_only_by_the_device_that_raised_it(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """The owner's laptop lost its device cookie (NEW_DEVICE); a thief with a copy of the refresh
    token (and of the device id) polls Refresh from their own browser. Before and after the owner
    approves by link on the phone (4.5) every thief Refresh answers the same challenge, never a
    Session; the laptop's repeated Refresh collects it, the session moves to the laptop only and
    no thief device is trusted."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        owner = await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))
        stolen = owner.refresh_token
        laptop = client(ip=HOME_2, ua=FIREFOX)  # the cookie with the device id is gone
        thieves = [
            client(ip=THIEF_IP, ua=CHROME),
            client(ip=THIEF_IP, ua=CHROME, device_id=owner.device_id),
            client(ip=THIEF_IP, ua="", device_id=owner.device_id),
            client(ip=THIEF_IP, ua=STRIPPED, device_id=owner.device_id),
            client(ip=THIEF_IP, ua=FIREFOX, device_id=owner.device_id),
        ]
        raised = await refresh(tokens, laptop, stolen)
        assert raised.mfa.reason == "NEW_DEVICE"
        for thief in thieves:
            polled = await refresh(tokens, thief, stolen)
            assert (polled.WhichOneof("result"), polled.mfa.challenge_id) == ("mfa", raised.mfa.challenge_id)

        token = link_token((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        approved = await mfa.RedeemMagicLink(mfa_pb2.RedeemMagicLinkRequest(client=PHONE, link_token=token))
        assert approved.WhichOneof("result") is None

        for thief in thieves:
            polled = await refresh(tokens, thief, stolen)
            assert (polled.WhichOneof("result"), polled.mfa.challenge_id) == ("mfa", raised.mfa.challenge_id)
        collected = await refresh(tokens, laptop, stolen)
    assert collected.WhichOneof("result") == "session"
    assert collected.session.session_id == owner.session_id
    assert collected.session.device_id not in ("", owner.device_id)
    async with iam.app.components.db.transaction() as tx:
        session = await tx.sessions.get(owner.session_id)
    assert session is not None
    assert session.device_id == collected.session.device_id
    assert await trusted_devices(iam, owner.user_id) == {owner.device_id, collected.session.device_id}
    # one challenge, one email: the thieves' polls raised nothing new
    await asyncio.sleep(0.3)
    assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 1


# an empty User-Agent is no wildcard ------------------------------------------------------------------


@pytest.mark.parametrize("ua", ["", STRIPPED], ids=["empty", "no browser"])
async def test_the_device_id_and_password_without_the_browser_get_the_new_device_challenge(
    iam: RunningService, ua: str
) -> None:
    """With the victim's device id (from the ``did`` claim) and password, a Login whose User-Agent
    is empty or lacks the browser does not match the device's baseline: NEW_DEVICE, no Session."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        owner = await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))
        answer = await auth.Login(
            auth_pb2.LoginRequest(
                client=client(ip=THIEF_IP, ua=ua, device_id=did_of(owner.access_token)),
                email=email,
                password=PASSWORD,
            )
        )
        own = await auth.Login(
            auth_pb2.LoginRequest(
                client=client(ip=HOME, ua=FIREFOX, device_id=owner.device_id), email=email, password=PASSWORD
            )
        )
    assert (answer.WhichOneof("result"), answer.mfa.reason) == ("mfa", "NEW_DEVICE")
    assert own.WhichOneof("result") == "session"


@pytest.mark.parametrize("ua", ["", STRIPPED], ids=["empty", "no browser"])
async def test_the_device_id_without_the_browser_does_not_pass_the_account_guard(
    iam: RunningService, ua: str
) -> None:
    """After 11 failed logins the account is guarded (login.account); the guard spares only the
    owner's trusted device, and the device id with an empty or stripped User-Agent is not it."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        owner = await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))
        for n in range(11):
            _, details = await failure(
                auth.Login(
                    auth_pb2.LoginRequest(
                        client=client(ip=f"192.0.2.{100 + n}"), email=email, password="not the password 1"
                    )
                )
            )
            assert details.reason == "INVALID_CREDENTIALS"
        guarded = await failure(
            auth.Login(
                auth_pb2.LoginRequest(
                    client=client(ip=THIEF_IP, ua=ua, device_id=did_of(owner.access_token)),
                    email=email,
                    password=PASSWORD,
                )
            )
        )
        own = await auth.Login(
            auth_pb2.LoginRequest(
                client=client(ip=HOME, ua=FIREFOX, device_id=owner.device_id), email=email, password=PASSWORD
            )
        )
    assert (guarded[0], guarded[1].reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert own.WhichOneof("result") == "session"


async def test_an_empty_user_agent_on_the_owners_device_id_is_a_changed_fingerprint(
    iam: RunningService,
) -> None:
    """Refresh with the token, the device id and the owner's network but an empty User-Agent: the
    fingerprint check (9) hits, no Session."""
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        owner = await signup(auth, new_email(), context=client(ip=HOME, ua=FIREFOX))
        answer = await refresh(
            token_pb2_grpc.TokenServiceStub(channel),
            client(ip=HOME_2, ua="", device_id=owner.device_id),
            owner.refresh_token,
        )
    assert (answer.WhichOneof("result"), answer.mfa.reason) == ("mfa", "FINGERPRINT_CHANGED")


# one pending challenge per kind ------------------------------------------------------------------------


async def test_a_step_up_leaves_a_pending_refresh_challenge_alone(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """S45: a refresh challenge is pending, StartStepUp makes its own; the next Refresh answers the
    first challenge again (no second code), and the step-up is still the one pending for its action.
    Both complete."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        owner = await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))
        here = client(ip=HOME, ua=FIREFOX, device_id=owner.device_id)
        laptop = client(ip=HOME, ua=FIREFOX)  # no device cookie: NEW_DEVICE
        first = await refresh(tokens, laptop, owner.refresh_token)
        code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
        start = mfa_pb2.StartStepUpRequest(client=here, access_token=owner.access_token, action="export")
        step_up = await mfa.StartStepUp(start)
        step_code = code_of((await wait_for_mail(mailbox, email, "Confirm an action"))[-1])
        again = await refresh(tokens, laptop, owner.refresh_token)
        assert again.mfa.challenge_id == first.mfa.challenge_id
        assert (await mfa.StartStepUp(start)).challenge_id == step_up.challenge_id
        await asyncio.sleep(0.3)
        subjects = [str(m["Subject"]) for m in mailbox.to(email)]
        assert len([s for s in subjects if "sign-in code" in s]) == 1
        assert len([s for s in subjects if "Confirm an action" in s]) == 1
        done = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(client=laptop, challenge_id=first.mfa.challenge_id, code=code)
        )
        granted = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(client=here, challenge_id=step_up.challenge_id, code=step_code)
        )
    assert done.WhichOneof("result") == "session"
    assert granted.WhichOneof("result") == "grant"


async def test_a_refresh_challenge_leaves_a_pending_step_up_alone(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """S45 the other way round: a step-up is pending, a Refresh raises a refresh challenge; the same
    StartStepUp answers the pending step-up (no second email) and the Refresh its own challenge."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        owner = await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))
        here = client(ip=HOME, ua=FIREFOX, device_id=owner.device_id)
        start = mfa_pb2.StartStepUpRequest(client=here, access_token=owner.access_token, action="export")
        step_up = await mfa.StartStepUp(start)
        raised = await refresh(tokens, client(ip=HOME, ua=FIREFOX), owner.refresh_token)
        assert raised.mfa.challenge_id != step_up.challenge_id
        assert (await mfa.StartStepUp(start)).challenge_id == step_up.challenge_id
        again = await refresh(tokens, client(ip=HOME, ua=FIREFOX), owner.refresh_token)
        assert again.mfa.challenge_id == raised.mfa.challenge_id
    await asyncio.sleep(0.3)
    subjects = [str(m["Subject"]) for m in mailbox.to(email)]
    assert len([s for s in subjects if "Confirm an action" in s]) == 1
    assert len([s for s in subjects if "sign-in code" in s]) == 1


async def test_two_browsers_without_a_device_id_each_keep_their_login_challenge(
    iam: RunningService, mailbox: Mailbox
) -> None:
    """4.1: one login challenge per (user, device). A phone and a desktop browser that both have no
    device id yet are two devices: logging in again from the phone answers the phone's pending
    challenge (no new code), although the desktop raised one in between."""
    email = new_email()
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        await signup(auth, email, context=client(ip=HOME, ua=FIREFOX))

        async def login(ua: str) -> str:
            answer = await auth.Login(
                auth_pb2.LoginRequest(client=client(ip=HOME_2, ua=ua), email=email, password=PASSWORD)
            )
            assert answer.mfa.reason == "NEW_DEVICE"
            return answer.mfa.challenge_id

        phone = await login(IPHONE)
        desktop = await login(CHROME)
        assert await login(IPHONE) == phone
        assert await login(CHROME) == desktop
    await wait_for_mail(mailbox, email, "sign-in code", count=2)
    await asyncio.sleep(0.3)
    assert len([m for m in mailbox.to(email) if "sign-in code" in str(m["Subject"])]) == 2


# cleanup keeps what recognises a replay ----------------------------------------------------------------


async def test_cleanup_between_the_theft_and_the_replay_still_ends_the_session(
    own_database: Backend, tmp_path: Path
) -> None:
    """S30 across a cleanup run: the thief rotates the owner's first token a minute before
    refresh.reuse_memory (7 d) has passed since it was issued; cleanup runs two minutes later; the
    owner's replay of that token is REFRESH_TOKEN_REUSED and ends the session (the thief's
    successor is SESSION_REVOKED), not TOKEN_INVALID. Once the session is over, the same rows do
    go after reuse_memory. The database is the test's own: the clock moves by weeks."""
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    environ = {**own_database.environ, **NO_ANOMALY_CHECKS}
    async with running_service(tmp_path, environ, clock=clock) as iam, iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        _, owner = await new_session(iam.app, ip=HOME, user_agent=FIREFOX)
        await iam.app.components.cleanup.run(lock=False)  # whatever the start left behind

        clock.advance(timedelta(days=7) - timedelta(minutes=1))
        thief = client(ip=THIEF_IP, ua=CHROME, device_id=owner.device_id)
        rotated = await refresh(tokens, thief, owner.refresh_token)
        assert rotated.WhichOneof("result") == "session"

        clock.advance(timedelta(minutes=2))
        removed = await iam.app.components.cleanup.run(lock=False)
        assert removed["refresh_tokens"] == 0

        status, details = await failure(
            refresh(tokens, client(ip=HOME, ua=FIREFOX, device_id=owner.device_id), owner.refresh_token)
        )
        assert (status, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
        status, details = await failure(refresh(tokens, thief, rotated.session.refresh_token))
        assert details.reason == "SESSION_REVOKED"

        clock.advance(timedelta(days=7) + timedelta(minutes=1))
        removed = await iam.app.components.cleanup.run(lock=False)
        assert removed["refresh_tokens"] == 2
