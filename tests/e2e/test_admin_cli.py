"""Operator commands against a running service sharing MariaDB and Redis
(keys, roles, users, cleanup; behaviour.md 11.7, S36)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import pytest

from iam_grpc.proto import mfa_pb2, mfa_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.e2e.test_cli import IAM, clean_env
from tests.integration.test_tokens import client
from tests.sessions_helper import NO_ANOMALY_CHECKS, new_session, new_user


async def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [IAM, *args], env=clean_env(**environ), capture_output=True, text=True, timeout=60
    )


async def reason(iam: RunningService, token: str) -> str:
    async with iam.channel() as channel:
        try:
            await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=token)
            )
        except grpc.aio.AioRpcError as error:
            return error_details(error).reason or ""
    return "OK"


async def test_disabling_a_user_ends_every_session_at_once(
    shared_own_database: Backend, tmp_path: Path
) -> None:
    """users disable: access tokens answer SESSION_REVOKED and Refresh SESSION_REVOKED (S36); the
    sessions' pending challenges end too (behaviour.md 1.6), and each ended session has its
    session.revoked audit event."""
    environ = {**shared_own_database.environ, **NO_ANOMALY_CHECKS, "IAM_DATA_DIR": str(tmp_path)}
    async with running_service(tmp_path, environ) as iam:
        user, session = await new_session(iam.app)
        async with iam.channel() as channel:
            step_up = await mfa_pb2_grpc.MfaServiceStub(channel).StartStepUp(
                mfa_pb2.StartStepUpRequest(
                    client=client(device_id=session.device_id),
                    access_token=session.access_token,
                    action="export",
                )
            )
        pending = await iam.app.components.challenges.get(step_up.challenge_id)
        assert pending is not None
        assert pending.state == "pending"
        result = await cli(environ, "users", "disable", user.email.upper())
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "disabled; 1 sessions ended"
        assert await reason(iam, session.access_token) == "SESSION_REVOKED"
        async with iam.channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await token_pb2_grpc.TokenServiceStub(channel).Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
                )
        assert error_details(refused.value).reason == "SESSION_REVOKED"
        ended = await iam.app.components.challenges.get(step_up.challenge_id)
        assert ended is not None
        assert ended.state == "failed"
        assert await iam.app.components.challenges.pending_for_session(session.session_id, "step_up") is None
        async with iam.app.components.db.transaction() as tx:
            events = await tx.audit.recent(user_id=user.id, type_prefix="session.revoked")
        # every ended session is named with its reason (9.6)
        assert [(event.session_id, event.details.get("reason")) for event in events] == [
            (session.session_id, "disabled")
        ]
        shown = json.loads((await cli(environ, "users", "show", user.id)).stdout)
        assert shown["status"] == "disabled"
        assert user.email not in json.dumps(shown)
        assert (await cli(environ, "users", "enable", user.id)).stdout.strip() == "active"


async def test_revoking_a_role_now_invalidates_current_tokens(
    shared_own_database: Backend, tmp_path: Path
) -> None:
    """roles revoke --now: the current access token is TOKEN_INVALID; the next refresh lacks the role (S36)."""
    environ = {**shared_own_database.environ, **NO_ANOMALY_CHECKS, "IAM_DATA_DIR": str(tmp_path)}
    async with running_service(tmp_path, environ) as iam:
        user = await new_user(iam.app)
        assert (await cli(environ, "roles", "grant", user.id, "admin")).stdout.strip() == "granted"
        _, session = await new_session(iam.app, user)
        assert await reason(iam, session.access_token) == "OK"
        listed = [json.loads(line) for line in (await cli(environ, "roles", "list")).stdout.splitlines()]
        assert {"role": "admin", "description": None, "holders": 1} in listed
        revoked = await cli(environ, "roles", "revoke", user.id, "admin", "--now")
        assert revoked.stdout.strip() == "revoked"
        assert await reason(iam, session.access_token) == "TOKEN_INVALID"
        async with iam.channel() as channel:
            stub = token_pb2_grpc.TokenServiceStub(channel)
            fresh = (
                await stub.Refresh(
                    token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token)
                )
            ).session
            verified = await stub.VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=fresh.access_token)
            )
        assert list(verified.roles) == ["user"]
        assert (await cli(environ, "roles", "grant", user.id, "Bad Role")).returncode == 2


async def test_keys_can_be_listed_and_rotated(shared_own_database: Backend, tmp_path: Path) -> None:
    """keys rotate publishes a new key; keys list shows both with their states; --revoke withdraws one."""
    environ = {**shared_own_database.environ, **NO_ANOMALY_CHECKS, "IAM_DATA_DIR": str(tmp_path)}
    async with running_service(tmp_path, environ) as iam:
        first = [json.loads(line) for line in (await cli(environ, "keys", "list")).stdout.splitlines()]
        assert [k["state"] for k in first] == ["signing"]
        rotated = await cli(environ, "keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        states = {
            k["kid"]: k["state"]
            for k in (json.loads(line) for line in (await cli(environ, "keys", "list")).stdout.splitlines())
        }
        assert sorted(states.values()) == ["published, not signing yet", "signing"]
        _, session = await new_session(iam.app)
        emergency = await cli(environ, "keys", "rotate", "--immediate", "--revoke", first[0]["kid"])
        assert emergency.returncode == 0, emergency.stderr
        assert await reason(iam, session.access_token) == "TOKEN_INVALID"
        assert (await cli(environ, "keys", "rotate", "--revoke", "nope")).returncode == 1
        async with iam.app.components.db.transaction() as tx:
            events = [e.type for e in await tx.audit.recent(type_prefix="keys.")]
        assert events.count("keys.created") == 2
        assert events.count("keys.revoked") == 1
        assert events.count("keys.activated") == 1  # the --immediate one only


async def test_cleanup_runs_on_demand(shared_own_database: Backend, tmp_path: Path) -> None:
    """cleanup run answers what it removed, per table."""
    environ = {**shared_own_database.environ, **NO_ANOMALY_CHECKS, "IAM_DATA_DIR": str(tmp_path)}
    async with running_service(tmp_path, environ):
        result = await cli(environ, "cleanup", "run")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {
        "refresh_tokens",
        "sessions",
        "outbox",
        "outbox_secrets",
        "audit_events",
        "devices",
        "revocations",
    }
