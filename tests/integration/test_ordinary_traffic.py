"""S18: ordinary traffic is never limited or blocked (behaviour.md 8.3, 3.2).

Two simulated hours of an office behind one NAT address, on the default limiter groups and
the default anomaly settings, through the real server in this process with an injected
:class:`~iam_grpc.clock.ManualClock` (the limiter's windows, the burst check, token expiry and
the in-memory store all read it), so the two hours take seconds. The test's channel is a
loopback caller, which the service trusts to relay ``client.ip`` as a local BFF would, so the
office address is what refresh.ip counts and what the anomaly checks see.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from iam_grpc.clock import ManualClock
from iam_grpc.proto import common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.testing import error_details, running_service
from tests.conftest import Backend
from tests.sessions_helper import FIREFOX, new_session

OFFICE_IP = "198.51.100.77"
SESSIONS = 50
TABS = 4
ROUNDS = 8  # two hours
CADENCE = timedelta(minutes=15)  # a BFF refreshes when the 15-minute access token runs out
SLOTS = SESSIONS + 1  # each office session, and the tabs, at their own moment of the quarter hour
TABS_SLOT = SESSIONS // 2
RATE_LIMITED = "RESOURCE_EXHAUSTED RATE_LIMITED"
ANOMALY_BLOCKED = "UNAUTHENTICATED ANOMALY_BLOCKED"


def context(device_id: str) -> common_pb2.ClientContext:
    """The client context of a browser in the office: one address, one browser, its device cookie."""
    return common_pb2.ClientContext(ip=OFFICE_IP, user_agent=FIREFOX, device_id=device_id)


async def refresh(
    stub: token_pb2_grpc.TokenServiceStub, token: str, device_id: str
) -> tuple[str, common_pb2.Session | None]:
    """One Refresh: ``("session", the session)``, ``("mfa", None)`` or ``("<CODE> <REASON>", None)``."""
    try:
        answer = await stub.Refresh(token_pb2.RefreshRequest(client=context(device_id), refresh_token=token))
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        return f"{details.code.name} {details.reason}", None
    kind = answer.WhichOneof("result")
    return str(kind), answer.session if kind == "session" else None


async def test_an_office_and_a_user_with_four_tabs_refresh_for_two_hours_unhindered(
    own_database: Backend, tmp_path: Path
) -> None:
    """S18: 50 sessions behind one ip each refreshing every 15 minutes for two hours, plus one
    user (behind the same ip) whose 4 tabs refresh concurrently each time, on the default limits
    and anomaly settings: every answer is a Session (no RATE_LIMITED, no ANOMALY_BLOCKED, no
    challenge), the 4 tabs always get one successor, and every new access token verifies.

    Runs on both backends: sqlite + the in-process store, and MySQL + Redis (the limiter and the
    burst check compute with the service's clock on both; Redis only keeps its keys longer in
    real time than the simulated windows need, which changes nothing the windows decide). The
    database is the test's own, so the clock's two-hour jump cannot age shared rows such as keys.
    """
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    async with (
        running_service(tmp_path, own_database.environ, clock=clock) as iam,
        iam.channel() as channel,
    ):
        stub = token_pb2_grpc.TokenServiceStub(channel)
        office = [(await new_session(iam.app, ip=OFFICE_IP))[1] for _ in range(SESSIONS)]
        tokens = {issued.session_id: issued.refresh_token for issued in office}
        _, tabs = await new_session(iam.app, ip=OFFICE_IP)
        tabs_token = tabs.refresh_token
        outcomes: Counter[str] = Counter()
        unverified: list[str] = []
        split_tabs: list[int] = []

        async def accepted(kind: str, session: common_pb2.Session | None, session_id: str) -> None:
            outcomes[kind] += 1
            if session is None:
                return
            assert session.session_id == session_id
            now = clock.now()
            # Nothing runs out within the cadence: the access token lasts the quarter hour (to the
            # whole second it was minted in), the refresh token (idle lifetime, sliding) far beyond
            # the next refresh.
            assert session.access_expires_at.ToDatetime(UTC) > now + CADENCE - timedelta(seconds=1)
            assert session.refresh_expires_at.ToDatetime(UTC) > now + CADENCE
            try:
                await stub.VerifyAccessToken(
                    token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
                )
            except grpc.aio.AioRpcError as error:
                unverified.append(f"{session_id}: {error_details(error).reason}")

        start = clock.now()
        for round_ in range(ROUNDS):
            for slot in range(SLOTS):
                clock.advance(start + round_ * CADENCE + slot * CADENCE / SLOTS - clock.now())
                if slot == TABS_SLOT:
                    answers = await asyncio.gather(
                        *(refresh(stub, tabs_token, tabs.device_id) for _ in range(TABS))
                    )
                    for kind, session in answers:
                        await accepted(kind, session, tabs.session_id)
                    successors = {session.refresh_token for _, session in answers if session is not None}
                    if len(successors) != 1 or len(answers) != sum(s is not None for _, s in answers):
                        split_tabs.append(round_)
                    if successors:
                        tabs_token = min(successors)  # keep the successor for the next round
                    continue
                issued = office[slot if slot < TABS_SLOT else slot - 1]
                kind, session = await refresh(stub, tokens[issued.session_id], issued.device_id)
                await accepted(kind, session, issued.session_id)
                if session is not None:
                    assert session.refresh_token != tokens[issued.session_id]
                    tokens[issued.session_id] = session.refresh_token
        elapsed = clock.now() - start
        registry = iam.app.metrics.registry

    total = ROUNDS * (SESSIONS + TABS)
    assert elapsed >= ROUNDS * CADENCE - CADENCE  # the last round starts at 1 h 45
    assert outcomes[RATE_LIMITED] == 0, (
        f"{outcomes[RATE_LIMITED]} of {total} refreshes rate limited: {outcomes}"
    )
    assert outcomes[ANOMALY_BLOCKED] == 0, f"{outcomes[ANOMALY_BLOCKED]} of {total} blocked: {outcomes}"
    assert outcomes["mfa"] == 0, f"{outcomes['mfa']} of {total} challenged: {outcomes}"
    assert outcomes == Counter({"session": total})
    assert split_tabs == [], f"the 4 tabs did not converge on one successor in rounds {split_tabs}"
    assert unverified == []
    # One rotation per client and round; the other 3 tabs were answered from the grace window.
    assert registry.get_sample_value("iam_refresh_total", {"outcome": "rotated"}) == ROUNDS * (SESSIONS + 1)
    assert registry.get_sample_value("iam_refresh_total", {"outcome": "grace"}) == ROUNDS * (TABS - 1)
    refused = [
        sample
        for metric in registry.collect()
        if metric.name in ("iam_ratelimit_refusals", "iam_anomaly_blocks")
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    ]
    assert refused == []
