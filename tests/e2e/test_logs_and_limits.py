"""Logs and limits as an operator sees them: real processes, real Redis.

The secret scan grows with every flow that lands: add the new secrets to
``SECRETS`` and the calls that carry them to ``drive``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from iam_grpc.proto import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from tests.conftest import REDIS_SERVER, TEST_MASTER_KEY, TEST_PEPPER
from tests.e2e.test_cli import IAM, clean_env, free_port, run, stop, wait_serving

PASSWORD = "correct horse battery staple " + secrets.token_hex(4)
NEW_PASSWORD = "another long passphrase " + secrets.token_hex(4)
REFRESH = "iamr_" + secrets.token_urlsafe(32)
ACCESS = (
    "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiIwMUoiLCJqdGkiOiJ4In0.c2lnbmF0dXJl"
    + secrets.token_hex(4)
)
LINK = "eyJhbGciOiJIUzI1NiJ9.eyJwdXIiOiJwYXNzd29yZF9yZXNldCJ9." + secrets.token_hex(8)
GRANT = "iamg_" + secrets.token_urlsafe(32)
CODE = f"{secrets.randbelow(10**6):06d}"
API_KEY = "iamk_bff_" + secrets.token_urlsafe(32)
EMAIL = f"leak.test.{secrets.token_hex(3)}@example.com"
SECRETS = [PASSWORD, NEW_PASSWORD, REFRESH, ACCESS, LINK, GRANT, API_KEY, TEST_MASTER_KEY, TEST_PEPPER]


def drive(address: str) -> list[str]:
    """Every RPC, carrying every kind of secret, plus refusals (rate limits, bad keys) and a bug.
    Returns the real secrets the service handed out on the way (session tokens, a challenge id)."""
    md = (("x-iam-api-key", API_KEY), ("x-request-id", "leak-test-0001"))
    client = common_pb2.ClientContext(
        ip="198.51.100.23", user_agent="Mozilla/5.0", device_id="dev_" + "a" * 22
    )
    with grpc.insecure_channel(address) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        token = token_pb2_grpc.TokenServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        calls = [
            lambda: auth.Signup(
                auth_pb2.SignupRequest(
                    client=client, email=EMAIL, password=PASSWORD, name="Leak", terms_accepted=True
                ),
                metadata=md,
            ),
            lambda: auth.Login(
                auth_pb2.LoginRequest(client=client, email=EMAIL, password=PASSWORD), metadata=md
            ),
            lambda: auth.Logout(auth_pb2.LogoutRequest(client=client, refresh_token=REFRESH), metadata=md),
            lambda: auth.RequestPasswordReset(
                auth_pb2.RequestPasswordResetRequest(client=client, email=EMAIL), metadata=md
            ),
            lambda: auth.ResetPassword(
                auth_pb2.ResetPasswordRequest(client=client, link_token=LINK, new_password=NEW_PASSWORD),
                metadata=md,
            ),
            lambda: auth.ChangePassword(
                auth_pb2.ChangePasswordRequest(
                    client=client, access_token=ACCESS, current_password=PASSWORD, new_password=NEW_PASSWORD
                ),
                metadata=md,
            ),
            lambda: auth.RequestEmailChange(
                auth_pb2.RequestEmailChangeRequest(client=client, access_token=ACCESS, new_email=EMAIL),
                metadata=md,
            ),
            lambda: auth.ConfirmEmailChange(
                auth_pb2.ConfirmEmailChangeRequest(client=client, link_token=LINK), metadata=md
            ),
            lambda: token.Refresh(
                token_pb2.RefreshRequest(client=client, refresh_token=REFRESH), metadata=md
            ),
            lambda: token.VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=ACCESS), metadata=md
            ),
            lambda: token.ListSessions(token_pb2.ListSessionsRequest(access_token=ACCESS), metadata=md),
            lambda: mfa.VerifyChallenge(
                mfa_pb2.VerifyChallengeRequest(client=client, challenge_id="ch_" + "c" * 22, code=CODE),
                metadata=md,
            ),
            lambda: mfa.RedeemMagicLink(
                mfa_pb2.RedeemMagicLinkRequest(client=client, link_token=LINK), metadata=md
            ),
            lambda: mfa.InspectMagicLink(mfa_pb2.InspectMagicLinkRequest(link_token=LINK), metadata=md),
            lambda: mfa.ConsumeStepUpGrant(
                mfa_pb2.ConsumeStepUpGrantRequest(grant_token=GRANT, action="delete-account"), metadata=md
            ),
            # an unknown key carrying a secret-looking value, and a burst that trips a limit and a block
            lambda: auth.Login(
                auth_pb2.LoginRequest(password=PASSWORD), metadata=(("x-iam-api-key", "iamk_x_" + REFRESH),)
            ),
            *[
                lambda: auth.Signup(auth_pb2.SignupRequest(client=client, password=PASSWORD), metadata=md)
                for _ in range(8)
            ],
        ]
        issued: list[str] = []
        for call in calls:
            with contextlib.suppress(grpc.RpcError):
                answer = call()
                session = getattr(answer, "session", None)
                if session is not None and session.refresh_token:
                    issued += [session.refresh_token, session.access_token]
                    issued += _flows_with(channel, md, client, session)
        return issued


def _flows_with(
    channel: grpc.Channel,
    md: tuple[tuple[str, str], ...],
    client: common_pb2.ClientContext,
    session: common_pb2.Session,
) -> list[str]:
    """The real tokens through refresh, a password change and a step-up; their secrets returned."""
    token = token_pb2_grpc.TokenServiceStub(channel)
    here = common_pb2.ClientContext(ip=client.ip, user_agent=client.user_agent, device_id=session.device_id)
    rotated = token.Refresh(
        token_pb2.RefreshRequest(client=here, refresh_token=session.refresh_token), metadata=md
    )
    auth_pb2_grpc.AuthServiceStub(channel).ChangePassword(
        auth_pb2.ChangePasswordRequest(
            client=here,
            access_token=session.access_token,
            current_password=PASSWORD,
            new_password=NEW_PASSWORD,
        ),
        metadata=md,
    )
    mfa_pb2_grpc.MfaServiceStub(channel).StartStepUp(
        mfa_pb2.StartStepUpRequest(client=here, access_token=session.access_token, action="delete-account"),
        metadata=md,
    )
    return [rotated.session.refresh_token, rotated.session.access_token]


@pytest.fixture
def leaky_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    grpc_port = free_port()
    env = clean_env(
        IAM_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        IAM_HTTP_LISTEN="",
        IAM_LOG_LEVEL="DEBUG",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        IAM_SECRETS__MASTER_KEY=TEST_MASTER_KEY,
        IAM_PASSWORDS__PEPPERS=json.dumps({"1": TEST_PEPPER}),
        IAM_PASSWORDS__CURRENT_PEPPER="1",
        IAM_CALLERS__BFF__API_KEY_SHA256=json.dumps([hashlib.sha256(API_KEY.encode()).hexdigest()]),
        IAM_CALLERS__BFF__METHODS='["*"]',
        IAM_CALLERS__BFF__TRUST_CLIENT_IP="true",
        IAM_TEST_FAILPOINTS="rpc:/iam.v1.TokenService/RevokeSession=raise",
    )
    process = subprocess.Popen(
        [IAM, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process, grpc_port, tmp_path
    finally:
        stop(process)


def test_no_secret_reaches_any_log_sink(leaky_server: tuple[subprocess.Popen[str], int, Path]) -> None:
    """Drive every RPC with secrets at DEBUG: stdout, stderr and every log file hold none of them (S49)."""
    process, port, folder = leaky_server
    wait_serving(port, process)
    issued = drive(f"127.0.0.1:{port}")
    assert len(issued) >= 4  # signup's session and its rotation (the flows really ran)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as bug:
        token_pb2_grpc.TokenServiceStub(channel).RevokeSession(
            token_pb2.RevokeSessionRequest(access_token=ACCESS, session_id="s"),
            metadata=(("x-iam-api-key", API_KEY),),
        )
    assert bug.value.code() == grpc.StatusCode.INTERNAL
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    stdout = process.stdout.read() if process.stdout else ""
    stderr = process.stderr.read() if process.stderr else ""
    files = {p.name: p.read_text() for p in (folder / "var" / "logs").glob("*.log")}
    assert set(files) == {"app.log", "error.log", "access.log", "audit.log"}
    assert "RuntimeError" in files["error.log"]  # the failpoint's traceback is there...
    assert files["audit.log"]  # ...and the rate-limit block and caller denial were audited
    everything = stdout + stderr + "".join(files.values())
    for secret in [*SECRETS, *issued]:
        assert secret not in everything, f"a secret reached the logs: {secret[:8]}…"
    assert CODE not in everything.replace("leak-test-0001", "")
    assert EMAIL not in everything
    for text in files.values():
        for line in text.splitlines():
            json.loads(line)  # every line is one JSON object
    request_lines = [json.loads(line) for line in stdout.splitlines() if "leak-test-0001" in line]
    assert request_lines
    assert {r.get("request_id") for r in request_lines} == {"leak-test-0001"}


def test_health_checks_stay_out_of_the_access_log_when_asked(tmp_path: Path) -> None:
    """logging.access_log_probes = false keeps health checks out of access.log even at DEBUG."""
    port = free_port()
    env = clean_env(
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN="",
        IAM_LOG_LEVEL="DEBUG",
        IAM_LOGGING__ACCESS_LOG_PROBES="false",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
    )
    process = subprocess.Popen(
        [IAM, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(port, process)  # a handful of health checks
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
            auth_pb2_grpc.AuthServiceStub(channel).Logout(auth_pb2.LogoutRequest())
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    finally:
        stop(process)
    methods = [
        json.loads(line)["method"]
        for line in (tmp_path / "var" / "logs" / "access.log").read_text().splitlines()
    ]
    assert methods == ["/iam.v1.AuthService/Logout"]


def shared_env(database_url: str, prefix: str, port: int) -> dict[str, str]:
    return clean_env(
        IAM_DATABASE_URL=database_url,
        IAM_REDIS_URL=REDIS_SERVER,
        IAM_REDIS__KEY_PREFIX=prefix,
        IAM_SECRETS__MASTER_KEY=TEST_MASTER_KEY,
        IAM_PASSWORDS__PEPPERS=json.dumps({"1": TEST_PEPPER}),
        IAM_PASSWORDS__CURRENT_PEPPER="1",
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN="",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        IAM_RATELIMIT__GROUPS='{"logout.ip": {"windows": ["6/1h"], "max_strikes": 0}}',
    )


def test_two_processes_sharing_redis_enforce_one_limit(tmp_path: Path, fresh_mysql: str) -> None:
    """Calls alternating between two replicas count against one shared limit."""
    prefix = f"iam_test_two_{secrets.token_hex(3)}:"
    ports = [free_port(), free_port()]
    processes = []
    for index, port in enumerate(ports):
        folder = tmp_path / f"replica{index}"
        folder.mkdir()
        if index == 0:
            assert run("migrate", cwd=folder, env=shared_env(fresh_mysql, prefix, port)).returncode == 0
        processes.append(
            subprocess.Popen(
                [IAM, "serve"],
                cwd=folder,
                env=shared_env(fresh_mysql, prefix, port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_serving(port, process)
        codes = []
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        try:
            for i in range(10):
                stub = auth_pb2_grpc.AuthServiceStub(channels[i % 2])
                client = common_pb2.ClientContext(ip="203.0.113.77")
                try:
                    stub.Logout(
                        auth_pb2.LogoutRequest(client=client, refresh_token="iamr_" + "u" * 43), timeout=5
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
        finally:
            for channel in channels:
                channel.close()
        assert codes == [grpc.StatusCode.OK] * 6 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        shown = run(
            "limits",
            "show",
            "logout.ip",
            "203.0.113.77",
            cwd=tmp_path,
            env=shared_env(fresh_mysql, prefix, ports[0]),
        )
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        assert state["estimates"] == [6.0]
        cleared = run(
            "limits",
            "clear",
            "logout.ip",
            "203.0.113.77",
            cwd=tmp_path,
            env=shared_env(fresh_mysql, prefix, ports[0]),
        )
        assert cleared.stdout.strip() == "cleared"
        with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            request = auth_pb2.LogoutRequest(
                client=common_pb2.ClientContext(ip="203.0.113.77"), refresh_token="iamr_" + "u" * 43
            )
            assert (
                auth_pb2_grpc.AuthServiceStub(channel).Logout(request, timeout=5) == auth_pb2.LogoutResponse()
            )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            finally:
                stop(process)


def test_limits_cli_explains_embedded_mode(tmp_path: Path) -> None:
    """Without Redis the limits live in the server's memory: the CLI says so instead of guessing."""
    result = run("limits", "show", "login.ip", "192.0.2.1", cwd=tmp_path)
    assert result.returncode == 1
    assert "serving process's memory" in result.stderr
