"""The Refresh anomaly checks (behaviour.md 3.2), each triggered and each not, with GeoIP databases
written by the tests (tests/geo_fixture.py) and real stores on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sqlalchemy import update

from iam_grpc.proto import auth_pb2_grpc, common_pb2, mfa_pb2, mfa_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.storage.sql.tables import refresh_tokens
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
from tests.geo_fixture import (
    BERLIN_IP,
    BERLIN_IP_2,
    BERLIN_OTHER_NET_IP,
    HOSTING_IP,
    MUNICH_IP,
    NEW_YORK_IP,
    SYDNEY_IP,
    TOR_IP,
    VPN_IP,
    GeoPaths,
    write_default_geo_databases,
)
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX

CHROME = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
FIREFOX_NEXT = FIREFOX.replace("rv:120.0", "rv:121.0").replace("Firefox/120.0", "Firefox/121.0")
LIMITS = {
    "refresh.ip": {"windows": ["1000/1s"]},
    "refresh.token": {"windows": ["1000/1m"]},
    "login.pair": {"windows": ["1000/1h fc"]},
    "code.ip": {"windows": ["1000/1s"]},
}


@pytest.fixture(scope="module")
def geo(tmp_path_factory: pytest.TempPathFactory) -> GeoPaths:
    return write_default_geo_databases(tmp_path_factory.mktemp("geo"))


def environment(backend: Backend, mailbox: Mailbox, geo: GeoPaths, **extra: str) -> dict[str, str]:
    return account_env(backend, mailbox, LIMITS, **geo.environ(), **extra)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, geo: GeoPaths, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    async with running_service(
        tmp_path_factory.mktemp("anomalies"), environment(backend, mailbox, geo)
    ) as running:
        yield running


async def account(iam: RunningService, email: str | None = None) -> common_pb2.Session:
    """A new account signed up from Berlin with Firefox: its device knows Berlin's network."""
    async with iam.channel() as channel:
        return await signup(
            auth_pb2_grpc.AuthServiceStub(channel),
            email or new_email(),
            context=client(ip=BERLIN_IP, ua=FIREFOX),
        )


async def refresh(
    iam: RunningService,
    session: common_pb2.Session,
    *,
    ip: str = BERLIN_IP_2,
    ua: str = FIREFOX,
    device_id: str | None = None,
) -> token_pb2.RefreshResponse:
    context = client(ip=ip, ua=ua, device_id=session.device_id if device_id is None else device_id)
    async with iam.channel() as channel:
        return await token_pb2_grpc.TokenServiceStub(channel).Refresh(
            token_pb2.RefreshRequest(client=context, refresh_token=session.refresh_token)
        )


def challenged(answer: token_pb2.RefreshResponse) -> str:
    """The challenge reason, or "" when the refresh answered a Session."""
    return answer.mfa.reason if answer.WhichOneof("result") == "mfa" else ""


async def test_an_ordinary_refresh_passes_every_check(iam: RunningService) -> None:
    """Same device, browser and /24 as at signup: a Session, and an audit trail without anomalies."""
    session = await account(iam)
    assert challenged(await refresh(iam, session)) == ""


# 2 device ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["", "dev_" + "A" * 22])
async def test_a_refresh_token_on_another_device_is_challenged(iam: RunningService, device: str) -> None:
    """No device cookie, or another device's: NEW_DEVICE."""
    assert challenged(await refresh(iam, await account(iam), device_id=device)) == "NEW_DEVICE"


# 3 idle -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hours", "reason"), [(71, ""), (73, "IDLE")])
async def test_a_device_unseen_for_three_days_is_challenged(
    iam: RunningService, hours: int, reason: str
) -> None:
    """anomaly.idle_after = 72 h, measured from the device link's last_seen_at."""
    session = await account(iam)
    async with iam.app.components.db.transaction() as tx:
        link = await tx.devices.get_link(session.user_id, session.device_id)
        assert link is not None
        await tx.devices.save_link(replace(link, last_seen_at=iam.app.clock.now() - timedelta(hours=hours)))
    assert challenged(await refresh(iam, session)) == reason


# 4 session count ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra_sessions", "reason"), [(4, ""), (5, "TOO_MANY_SESSIONS")])
async def test_many_live_sessions_are_challenged(
    iam: RunningService, extra_sessions: int, reason: str
) -> None:
    """More than anomaly.max_sessions = 5 live sessions and no recent MFA on this one."""
    session = await account(iam)
    from iam_grpc.core.client import ClientInfo

    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(session.user_id)
    assert user is not None
    for _ in range(extra_sessions):
        async with iam.app.components.db.transaction() as tx:
            await iam.app.components.sessions.open_session(
                tx,
                user,
                ClientInfo(ip=BERLIN_IP, user_agent=FIREFOX, device_id=session.device_id),
                trust_device=True,
            )
    assert challenged(await refresh(iam, session)) == reason


# 5 rotation burst --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed_in", [timedelta(0), timedelta(hours=1)], ids=["new", "older"])
async def test_a_burst_of_rotations_blocks_and_ends_the_session(
    iam: RunningService, signed_in: timedelta
) -> None:
    """anomaly.burst_max = 3 rotations in 10 minutes: the fourth is ANOMALY_BLOCKED naming
    rotation_burst and the session is over, whether the session was signed in just now or an hour
    ago (the sign-in's own token is not a rotation)."""
    session = await account(iam)
    async with iam.app.components.db.transaction() as tx:
        await tx.connection.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.session_id == session.session_id)
            .values(created_at=iam.app.clock.now() - signed_in)
        )
    for _ in range(3):
        session = (await refresh(iam, session)).session
    async with iam.channel() as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        request = token_pb2.RefreshRequest(
            client=client(ip=BERLIN_IP_2, device_id=session.device_id), refresh_token=session.refresh_token
        )
        status, details = await failure(stub.Refresh(request))
        assert (status, details.reason, details.metadata) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "ANOMALY_BLOCKED",
            {"check": "rotation_burst"},
        )
        assert (await failure(stub.Refresh(request)))[1].reason == "SESSION_REVOKED"


# 6 network ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "reason"),
    [(BERLIN_IP_2, ""), (BERLIN_OTHER_NET_IP, ""), (NEW_YORK_IP, "IP_CHANGED")],
    ids=["same /24", "same provider and country", "another continent"],
)
async def test_an_unknown_network_is_challenged(iam: RunningService, ip: str, reason: str) -> None:
    """The ip passes by its /24 or by the same ASN and country; anything else is IP_CHANGED."""
    assert challenged(await refresh(iam, await account(iam), ip=ip)) == reason


# 7 risk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("points", "reason"), [(24, ""), (25, "SUSPICIOUS_ACTIVITY")])
async def test_a_risky_address_is_challenged(iam: RunningService, points: int, reason: str) -> None:
    """Risk points of the ip within 24 h at anomaly.risk_threshold = 25."""
    session = await account(iam)
    risky = f"192.0.2.{100 + points}"
    await iam.app.components.risk.add(ip=risky, ip_points=points)
    assert challenged(await refresh(iam, session, ip=risky)) == reason


# 9 fingerprint ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ua", "reason"), [(FIREFOX_NEXT, ""), (CHROME, "FINGERPRINT_CHANGED")])
async def test_a_changed_browser_is_challenged_but_an_update_is_not(
    iam: RunningService, ua: str, reason: str
) -> None:
    """Firefox 120 -> 121 passes; Firefox -> Chrome with the same device cookie is FINGERPRINT_CHANGED."""
    assert challenged(await refresh(iam, await account(iam), ua=ua)) == reason


# 8 proxy / hosting and 10 travel (each alone: the network check would answer first) ------------------


@pytest_asyncio.fixture(loop_scope="session")
async def alone(
    backend: Backend, mailbox: Mailbox, geo: GeoPaths, tmp_path: Path
) -> AsyncIterator[RunningService]:
    """A service whose network and fingerprint checks are off, so that checks 8 and 10 can be seen
    on their own (a far-away address is also a new network and a new country)."""
    env = environment(
        backend,
        mailbox,
        geo,
        IAM_ANOMALY__NETWORK__ACTION="off",
        IAM_ANOMALY__FINGERPRINT__ACTION="off",
        IAM_ANOMALY__TOR__ACTION="block",
    )
    async with running_service(tmp_path, env) as running:
        yield running


@pytest.mark.parametrize(("ip", "reason"), [(VPN_IP, "PROXY_OR_HOSTING"), (HOSTING_IP, "PROXY_OR_HOSTING")])
async def test_proxies_and_hosting_are_challenged_until_allowed(
    alone: RunningService, mailbox: Mailbox, ip: str, reason: str
) -> None:
    """A VPN or hosting address: PROXY_OR_HOSTING; once that challenge is passed the device holds an
    allowance and the next refresh from such an address passes."""
    email = new_email()
    session = await account(alone, email)
    answer = await refresh(alone, session, ip=ip)
    assert challenged(answer) == reason
    code = code_of((await wait_for_mail(mailbox, email, "sign-in code"))[-1])
    async with alone.channel() as channel:
        done = await mfa_pb2_grpc.MfaServiceStub(channel).VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=client(ip=ip, ua=FIREFOX, device_id=session.device_id),
                challenge_id=answer.mfa.challenge_id,
                code=code,
            )
        )
    assert challenged(await refresh(alone, done.session, ip=ip)) == ""


async def test_tor_exits_follow_their_own_action(alone: RunningService) -> None:
    """anomaly.tor.action = block: a Tor exit node is ANOMALY_BLOCKED (check proxy)."""
    session = await account(alone)
    async with alone.channel() as channel:
        _status, details = await failure(
            token_pb2_grpc.TokenServiceStub(channel).Refresh(
                token_pb2.RefreshRequest(
                    client=client(ip=TOR_IP, device_id=session.device_id), refresh_token=session.refresh_token
                )
            )
        )
    assert (details.reason, details.metadata) == ("ANOMALY_BLOCKED", {"check": "proxy"})


@pytest.mark.parametrize(("ip", "reason"), [(MUNICH_IP, ""), (SYDNEY_IP, "IMPOSSIBLE_TRAVEL")])
async def test_impossible_travel_is_challenged(alone: RunningService, ip: str, reason: str) -> None:
    """Berlin then Munich minutes later is possible; Berlin then Sydney is not."""
    assert challenged(await refresh(alone, await account(alone), ip=ip)) == reason


async def test_without_anonymity_data_the_proxy_check_is_skipped(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """No anonymous-IP database and no hosting ASNs: a VPN address is not held against anyone."""
    env = account_env(backend, mailbox, LIMITS, IAM_ANOMALY__NETWORK__ACTION="off")
    async with running_service(tmp_path, env) as iam:
        assert challenged(await refresh(iam, await account(iam), ip=VPN_IP)) == ""


async def test_checks_can_be_switched_off(
    backend: Backend, mailbox: Mailbox, geo: GeoPaths, tmp_path: Path
) -> None:
    """anomaly.device.action = off: a refresh without the device cookie rotates."""
    env = environment(backend, mailbox, geo, IAM_ANOMALY__DEVICE__ACTION="off")
    async with running_service(tmp_path, env) as iam:
        assert challenged(await refresh(iam, await account(iam), device_id="")) == ""


async def test_every_hit_is_audited_with_its_inputs(iam: RunningService) -> None:
    """An anomaly.challenge event names the check, the reason and the compared values, no secrets."""
    session = await account(iam)
    answer = await refresh(iam, session, ip=NEW_YORK_IP)
    await iam.app.components.audit.drain()
    async with iam.app.components.db.transaction() as tx:
        events = await tx.audit.recent(user_id=session.user_id, type_prefix="anomaly.")
    (event,) = events
    assert event.details["check"] == "network"
    assert event.details["reason"] == "IP_CHANGED"
    assert event.details["challenge"] == answer.mfa.challenge_id
    assert event.details["country"] == "US"
    assert session.refresh_token not in str(event.details)
    assert PASSWORD not in str(event.details)
