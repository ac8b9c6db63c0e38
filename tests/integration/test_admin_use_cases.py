"""The operator use-cases of ``iam_grpc.admin`` called in the service's own process, as an admin
RPC will call them (``AdminTools.from_components``): the same effects as the CLI's, on the
running service's own state, on both backends."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest

from iam_grpc.admin import (
    AdminTools,
    Invalid,
    NotFound,
    Unavailable,
    create_role,
    delete_role,
    grant_role,
    list_keys,
    list_roles,
    live_sessions,
    revoke_role,
    revoke_sessions,
    set_status,
    show_limits,
    show_user,
)
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import client, failure
from tests.conftest import Backend
from tests.sessions_helper import NO_ANOMALY_CHECKS, new_session, new_user


async def verified(iam: RunningService, token: str) -> str:
    """VerifyAccessToken's reason for ``token`` ("OK" when it verifies)."""
    async with iam.channel() as channel:
        try:
            await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=token)
            )
        except grpc.aio.AioRpcError as error:
            return error_details(error).reason or ""
    return "OK"


async def test_disabling_in_process_ends_sessions_and_their_challenges_at_once(
    backend: Backend, tmp_path: Path
) -> None:
    """From the service's own components, even in embedded mode, a disabled user's access tokens
    stop verifying at once and the account shows disabled with no live session."""
    async with running_service(tmp_path, {**backend.isolated(), **NO_ANOMALY_CHECKS}) as iam:
        tools = AdminTools.from_components(iam.app.components)
        assert tools.reaches_service_state
        user, session = await new_session(iam.app)
        assert [s.id for s in await live_sessions(tools, user.email.upper())] == [session.session_id]
        ended = await set_status(tools, user.id, "disabled")
        assert (ended.count, ended.reached_service_state) == (1, True)
        assert await verified(iam, session.access_token) == "SESSION_REVOKED"
        async with iam.channel() as channel:
            _, details = await failure(
                token_pb2_grpc.TokenServiceStub(channel).Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
                )
            )
        assert details.reason == "SESSION_REVOKED"
        shown = await show_user(tools, user.id)
        assert (shown.status, shown.live_sessions) == ("disabled", [])
        assert user.email not in shown.email  # masked
        assert (await set_status(tools, user.id, "active")).count == 0
        assert (await revoke_sessions(tools, user.id)).count == 0


async def test_roles_round_trip_and_refuse_what_does_not_exist(backend: Backend, tmp_path: Path) -> None:
    """Grant, list, revoke with ``now`` and delete; unknown users, roles and malformed names are
    NotFound and Invalid."""
    # The database is shared by the tests of one run (other files grant "auditor" too), so this
    # test's role is its own.
    role = f"auditor-{secrets.token_hex(4)}"
    async with running_service(tmp_path, {**backend.isolated(), **NO_ANOMALY_CHECKS}) as iam:
        tools = AdminTools.from_components(iam.app.components)
        user = await new_user(iam.app)
        assert await grant_role(tools, user.id, role)
        assert not await grant_role(tools, user.id, role)
        _, session = await new_session(iam.app, user)
        assert (role, 1) in {(r.role, r.holders) for r in await list_roles(tools)}
        revoked = await revoke_role(tools, user.id, role, now=True)
        assert (revoked.revoked, revoked.tokens, revoked.cached) == (True, 1, True)
        assert await verified(iam, session.access_token) == "TOKEN_INVALID"
        await create_role(tools, role)
        await delete_role(tools, role)
        with pytest.raises(NotFound):
            await delete_role(tools, role)
        with pytest.raises(NotFound):
            await grant_role(tools, "nobody@example.com", role)
        with pytest.raises(Invalid):
            await create_role(tools, "Bad Role")


async def test_keys_and_limits_answer_from_the_running_service(backend: Backend, tmp_path: Path) -> None:
    """The signing key in use is listed as signing; the limits of a key are readable where they
    are shared (Redis) and Unavailable where they live in one process's memory."""
    async with running_service(tmp_path, backend.isolated()) as iam:
        tools = AdminTools.from_components(iam.app.components)
        assert [key.state for key in await list_keys(tools)] == ["signing"]
        if backend.shared:
            shown = await show_limits(tools, "login.ip", "192.0.2.1")
            assert shown["group"] == "login.ip"
            with pytest.raises(Invalid):
                await show_limits(tools, "no.such.group", "192.0.2.1")
        else:
            with pytest.raises(Unavailable):
                await show_limits(tools, "login.ip", "192.0.2.1")
