"""Enumeration and input-handling requirements of the account flows (security.md S4, S5, S6, S55).

The service runs with the default limiter groups (behaviour.md 8.3), bursts included, so the
bounds under test are the ones a deployment gets. Every test takes client ips of its own, so the
ip-keyed groups of one test never count another test's calls.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import grpc
import pytest
import pytest_asyncio

from iam_grpc.core.ratelimit import email_key
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import ErrorDetails, RunningService, running_service
from tests.accounts_helper import (
    PASSWORD,
    client,
    failure,
    link_token,
    new_email,
    signup,
    text_of,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.mailbox import Mailbox

FLOOR = 0.5  # reset.response_floor, default (also pads RequestEmailChange, 2.7)
BREACHED = "Password1234"  # passes the input rules, refused at step 5 of Signup (after its limiters)
MARKUP_NAME = "<b>Zo\u00eb</b>"
JWT_SHAPE = re.compile(r"[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}")
_addresses = itertools.count(1)


def next_ip() -> str:
    """A client ip no other call of this module has used."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    # no IAM_RATELIMIT__GROUPS: every group keeps its default windows, strikes and blocks
    env = {**backend.isolated(), "IAM_SMTP_URL": mailbox.url, "IAM_MAIL__POLL_INTERVAL": "100ms"}
    async with running_service(tmp_path_factory.mktemp("account-security"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def _metadata(pairs: Any) -> tuple[tuple[str, Any], ...]:
    """Metadata without the per-call request id, in order."""
    return tuple((key, value) for key, value in (pairs or ()) if key != "x-request-id")


async def answer_of(call: Any) -> tuple[object, ...]:
    """Everything a successful call shows its caller except the request id: the serialized response,
    status code and message, initial and trailing metadata."""
    response = await call
    return (
        response.SerializeToString(deterministic=True),
        await call.code(),
        await call.details(),
        _metadata(await call.initial_metadata()),
        _metadata(await call.trailing_metadata()),
    )


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def subjects(mailbox: Mailbox, address: str) -> list[str]:
    return [str(m["Subject"]) for m in mailbox.to(address)]


# S4 ------------------------------------------------------------------------------------------


async def test_reset_suppression_answers_alike_for_registered_and_unregistered_addresses(
    stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """S4: five RequestPasswordReset per address, each from a client ip of its own, interleaved: all
    ten answers are identical (response bytes, status, metadata but the request id) through and past
    the per-address suppression; the registered address receives exactly 3 emails, the other none."""
    registered, unregistered = new_email(), new_email()
    await signup(stub, registered, context=client(ip=next_ip()))
    answers = []
    for _ in range(5):
        for address in (registered, unregistered):
            request = auth_pb2.RequestPasswordResetRequest(client=client(ip=next_ip()), email=address)
            answers.append(await answer_of(stub.RequestPasswordReset(request)))
    assert answers[0][1] == grpc.StatusCode.OK
    assert answers == [answers[0]] * 10
    await wait_for_mail(mailbox, registered, "Reset your", count=3)
    await asyncio.sleep(1.0)  # two further polls of the sender: a 4th or 5th email would show up
    assert [s.startswith("Reset your") for s in subjects(mailbox, registered)] == [True] * 3
    assert mailbox.to(unregistered) == []


# S5 ------------------------------------------------------------------------------------------


def assert_no_link(body: str) -> None:
    """No link, token or anything shaped like a signed link in a mail body."""
    lowered = body.lower()
    assert "token" not in lowered, body
    assert "://" not in body, body
    assert "href" not in lowered, body
    assert JWT_SHAPE.search(body) is None, body


async def test_email_change_answers_alike_for_a_free_and_a_taken_address(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """S5: RequestEmailChange to a free and to a taken address give identical answers, both after the
    response floor; the free address gets a confirmation link that works, the taken one only the
    email_in_use notice, with no link or token in its text or HTML part."""
    old, free, taken = new_email(), new_email(), new_email()
    await signup(stub, taken, context=client(ip=next_ip()))
    ip = next_ip()
    session = await signup(stub, old, context=client(ip=ip))
    answers, durations = [], []
    for address in (free, taken):
        request = auth_pb2.RequestEmailChangeRequest(
            client=client(ip=ip, device_id=session.device_id),
            access_token=session.access_token,
            new_email=address,
        )
        started = time.monotonic()
        answers.append(await answer_of(stub.RequestEmailChange(request)))
        durations.append(time.monotonic() - started)
    assert answers[0][1] == grpc.StatusCode.OK
    assert answers[0] == answers[1]
    assert min(durations) >= FLOOR

    (confirmation,) = await wait_for_mail(mailbox, free, "Confirm your new")
    (notice,) = await wait_for_mail(mailbox, taken, "tried to use your address")
    assert_no_link(text_of(notice))
    assert_no_link(html_of(notice))
    await asyncio.sleep(0.5)  # a late confirmation email to the taken address would show up
    assert subjects(mailbox, taken) == [str(notice["Subject"])]

    await stub.ConfirmEmailChange(
        auth_pb2.ConfirmEmailChangeRequest(client=client(ip=ip), link_token=link_token(confirmation))
    )
    login = await stub.Login(
        auth_pb2.LoginRequest(
            client=client(ip=ip, device_id=session.device_id), email=free, password=PASSWORD
        )
    )
    assert login.WhichOneof("result") == "session"
    assert login.session.user_id == session.user_id


# S6 ------------------------------------------------------------------------------------------


async def registered_long_ago(iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, email: str) -> None:
    """An account for ``email``, whose own signup no longer counts in ``signup.email`` (3/24 h): the
    operator's ``ratelimit clear`` (behaviour.md 8.6) stands for the day that has passed since. Left
    counted, the registration would use one of the address's three daily signups, and the third
    probe would already be refused (scope email) before the pair bound is reached."""
    await signup(stub, email, context=client(ip=next_ip()))
    await iam.app.components.limiter.clear("signup.email", email_key(email))


async def next_buckets(iam: RunningService, count: int) -> None:
    """Sleep into the ``count``-th next whole second of the service clock.

    The 1 s burst windows are sliding counters over whole seconds: after a hit, ``1/1s`` (signup.pair)
    frees its point only two second boundaries later, ``2/1s`` (signup.ip) allows one more hit per
    second. Called after the calls have answered, so their timestamps are behind ``now``."""
    now = iam.app.clock.now().timestamp()
    await asyncio.sleep(math.floor(now) + count + 0.05 - now)


def assert_alike_refusals(
    taken: tuple[grpc.StatusCode, ErrorDetails], free: tuple[grpc.StatusCode, ErrorDetails], scope: str
) -> None:
    """Both RATE_LIMITED for ``scope`` with equal code, reason, domain, metadata, message and
    violations, and retry delays less than a second apart."""
    (taken_code, t), (free_code, f) = taken, free
    assert (taken_code, t.reason, t.metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"scope": scope},
    )
    assert (taken_code, t.reason, t.domain, t.metadata, t.message, t.field_violations) == (
        free_code,
        f.reason,
        f.domain,
        f.metadata,
        f.message,
        f.field_violations,
    )
    assert t.retry_delay is not None
    assert f.retry_delay is not None
    assert abs(t.retry_delay - f.retry_delay) <= timedelta(seconds=1)


async def test_the_fourth_signup_on_one_pair_is_refused_alike_for_taken_and_free_addresses(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """S6, signup.pair (default 1/1 s + 3/24 h): three probes of a taken address from one ip say
    EMAIL_TAKEN; three attempts on a free address from another ip fail after the limiters (breached
    password), so it stays free; the 4th attempt of each pair, with a valid password, gets
    RATE_LIMITED, and the two refusals look the same."""
    taken, free = new_email(), new_email()
    await registered_long_ago(iam, stub, taken)
    taken_ip, free_ip = next_ip(), next_ip()
    for _ in range(3):
        results = await asyncio.gather(
            failure(signup(stub, taken, context=client(ip=taken_ip))),
            failure(signup(stub, free, BREACHED, context=client(ip=free_ip))),
        )
        assert [details.reason for _, details in results] == ["EMAIL_TAKEN", "PASSWORD_BREACHED"]
        await next_buckets(iam, 2)
    refusals = await asyncio.gather(
        failure(signup(stub, taken, context=client(ip=taken_ip))),
        failure(signup(stub, free, context=client(ip=free_ip))),
    )
    assert_alike_refusals(*refusals, scope="ip_email")


async def test_the_sixth_signup_from_one_ip_is_refused_alike_for_taken_and_free_addresses(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """S6, signup.ip (default 2/1 s + 5/30 min): after five signups from each of two ips (other
    addresses, failing after the limiters), the 6th, for a taken address from one ip and a free
    address from the other, with a valid password, gets RATE_LIMITED, and the refusals look the same."""
    taken, free = new_email(), new_email()
    await registered_long_ago(iam, stub, taken)
    taken_ip, free_ip = next_ip(), next_ip()
    for _ in range(5):
        results = await asyncio.gather(
            failure(signup(stub, new_email(), BREACHED, context=client(ip=taken_ip))),
            failure(signup(stub, new_email(), BREACHED, context=client(ip=free_ip))),
        )
        assert [details.reason for _, details in results] == ["PASSWORD_BREACHED"] * 2
        await next_buckets(iam, 1)
    refusals = await asyncio.gather(
        failure(signup(stub, taken, context=client(ip=taken_ip))),
        failure(signup(stub, free, context=client(ip=free_ip))),
    )
    assert_alike_refusals(*refusals, scope="ip")


# S55 -----------------------------------------------------------------------------------------


async def test_markup_in_a_name_is_stored_verbatim_escaped_in_html_and_never_punished(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, mailbox: Mailbox
) -> None:
    """S55: Signup with name ``<b>Zoë</b>`` (and last name ``O'Connor``) stores both unchanged; the
    reset email's HTML part shows the name escaped (its text part verbatim); afterwards that ip can
    sign up again and log in, and the new access token verifies."""
    ip, email = next_ip(), new_email()
    session = await signup(stub, email, name=MARKUP_NAME, last_name="O'Connor", context=client(ip=ip))
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(session.user_id)
    assert user is not None
    assert (user.name, user.last_name) == (MARKUP_NAME, "O'Connor")

    await stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(ip=ip), email=email))
    (message,) = await wait_for_mail(mailbox, email, "Reset your")
    html = html_of(message)
    assert "Hello &lt;b&gt;Zo\u00eb&lt;/b&gt;," in html
    assert MARKUP_NAME not in html
    assert f"Hello {MARKUP_NAME}," in text_of(message)

    await signup(stub, context=client(ip=ip))
    login = await stub.Login(
        auth_pb2.LoginRequest(
            client=client(ip=ip, device_id=session.device_id), email=email, password=PASSWORD
        )
    )
    assert login.WhichOneof("result") == "session"
    async with iam.channel() as channel:
        verified = await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=login.session.access_token)
        )
    assert verified.user_id == session.user_id
