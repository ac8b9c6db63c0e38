"""Every session that ends says why: a ``session.revoked`` audit event naming the session and the
reason it was ended for, whatever ended it (behaviour.md 1.5, 1.6, 9.6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from iam_grpc.clock import ManualClock
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.proto import mfa_pb2, mfa_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import account_env, client, code_of, failure, wait_for_mail
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import IPHONE, NO_ANOMALY_CHECKS, new_session


async def endings(iam: RunningService, user_id: str) -> set[tuple[str | None, str | None]]:
    """(session id, reason) of every session.revoked event of the user."""
    async with iam.app.components.db.transaction() as tx:
        events = await tx.audit.recent(user_id=user_id, type_prefix="session.revoked")
    return {(event.session_id, event.details.get("reason")) for event in events}


async def test_sessions_that_run_out_say_so(backend: Backend, tmp_path: Path) -> None:
    """A Refresh that finds the token idle past refresh.idle_ttl, or the session past
    refresh.absolute_ttl, ends the session with an event of reason idle or expired."""
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    async with (
        running_service(tmp_path, {**backend.isolated(), **NO_ANOMALY_CHECKS}, clock=clock) as iam,
        iam.channel() as channel,
    ):
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        user, idle = await new_session(iam.app)
        _, busy = await new_session(iam.app, user)

        async def refresh(session: IssuedSession, token: str) -> str:
            request = token_pb2.RefreshRequest(
                client=client(device_id=session.device_id), refresh_token=token
            )
            return (await tokens.Refresh(request)).session.refresh_token

        async def expired(session: IssuedSession, token: str) -> tuple[str, dict[str, str]]:
            request = token_pb2.RefreshRequest(
                client=client(device_id=session.device_id), refresh_token=token
            )
            _, details = await failure(tokens.Refresh(request))
            return details.reason, details.metadata

        clock.advance(timedelta(days=6))
        token = await refresh(busy, busy.refresh_token)
        clock.advance(timedelta(days=2))  # the idle session's token is 8 days old
        assert await expired(idle, idle.refresh_token) == ("SESSION_EXPIRED", {"limit": "idle"})
        for _ in range(4):  # days 8, 14, 20, 26: never idle
            token = await refresh(busy, token)
            clock.advance(timedelta(days=6))
        assert await expired(busy, token) == ("SESSION_EXPIRED", {"limit": "absolute"})
        assert await endings(iam, user.id) == {(idle.session_id, "idle"), (busy.session_id, "expired")}


async def test_revoke_all_names_every_session_it_ends(backend: Backend, tmp_path: Path) -> None:
    """RevokeAllSessions(keep_current) writes one event per ended session with reason all, and
    none for the session that lives on."""
    async with running_service(tmp_path, backend.isolated()) as iam, iam.channel() as channel:
        user, current = await new_session(iam.app)
        _, phone = await new_session(iam.app, user, user_agent=IPHONE)
        _, tablet = await new_session(iam.app, user, user_agent=IPHONE)
        await token_pb2_grpc.TokenServiceStub(channel).RevokeAllSessions(
            token_pb2.RevokeAllSessionsRequest(access_token=current.access_token, keep_current=True)
        )
        assert await endings(iam, user.id) == {(phone.session_id, "all"), (tablet.session_id, "all")}


async def test_a_rotation_burst_and_an_exhausted_challenge_say_why(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Check 5 ending a session writes reason rotation_burst; the last wrong code of a refresh
    challenge writes reason mfa_failed."""
    env = account_env(backend, mailbox, {"code.ip": {"windows": ["1000/1s"]}})
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        tokens = token_pb2_grpc.TokenServiceStub(channel)
        user, burst = await new_session(iam.app)
        token, blocked = burst.refresh_token, ""
        for _ in range(10):
            request = token_pb2.RefreshRequest(client=client(device_id=burst.device_id), refresh_token=token)
            try:
                token = (await tokens.Refresh(request)).session.refresh_token
            except grpc.aio.AioRpcError as error:
                blocked = error_details(error).reason
                break
        assert blocked == "ANOMALY_BLOCKED"

        _, guessed = await new_session(iam.app, user)
        raised = await tokens.Refresh(  # no device cookie: NEW_DEVICE
            token_pb2.RefreshRequest(client=client(), refresh_token=guessed.refresh_token)
        )
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        code = code_of((await wait_for_mail(mailbox, user.email, "sign-in code"))[-1])
        wrong = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
        for _ in range(5):
            await failure(
                mfa.VerifyChallenge(
                    mfa_pb2.VerifyChallengeRequest(
                        client=client(), challenge_id=raised.mfa.challenge_id, code=wrong
                    )
                )
            )
        assert await endings(iam, user.id) == {
            (burst.session_id, "rotation_burst"),
            (guessed.session_id, "mfa_failed"),
        }
