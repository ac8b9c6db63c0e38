"""Logs and limits as an operator sees them: real processes, real Redis.

The secret scan grows with every flow that lands: add the new secrets to
``SECRETS`` and the calls that carry them to ``drive``. Every refusal ``drive``
provokes is collected on the way and scanned for what an error must never
show a caller (S7).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.rpc import error_details_pb2, status_pb2

from iam_grpc.proto import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from iam_grpc.testing import error_details
from tests.conftest import REDIS_SERVER, TEST_MASTER_KEY, TEST_PEPPER
from tests.e2e.test_cli import IAM, clean_env, free_port, run, stop, wait_serving
from tests.log_scan import address_forms, leaked

PASSWORD = "correct horse battery staple " + secrets.token_hex(4)
NEW_PASSWORD = "another long passphrase " + secrets.token_hex(4)
WRONG_PASSWORD = "a wrong passphrase " + secrets.token_hex(4)
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
NAME = f"Leakname{secrets.token_hex(3)}"  # distinctive, so that a hit is a leak and not a word
SECRETS = [
    PASSWORD,
    NEW_PASSWORD,
    WRONG_PASSWORD,
    REFRESH,
    ACCESS,
    LINK,
    GRANT,
    API_KEY,
    TEST_MASTER_KEY,
    TEST_PEPPER,
]


@dataclass(frozen=True)
class Refusal:
    """One non-OK status as a caller receives it: everything in it a caller can read, decoded."""

    method: str
    code: str
    reason: str
    texts: tuple[tuple[str, str], ...]  # (where it was found, the text)


_KNOWN_DETAILS = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo)


def _refusal(method: str, call: Any) -> Refusal:
    """Decode a failed call: its message, every trailer, and each ``google.rpc.Status`` detail
    (ErrorInfo reason, domain and metadata, BadRequest violations, and any other detail in text
    form). The x-request-id trailer is left out, and the request id is cut from the INTERNAL
    message: api.md documents both as the caller's own id echoed back."""
    details = error_details(call)
    request_id = ""
    texts: list[tuple[str, str]] = []
    for key, value in call.trailing_metadata() or ():
        if key == "x-request-id":
            request_id = str(value)
        elif key != "grpc-status-details-bin":
            shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            texts.append((f"trailer {key}", f"{key}: {shown}"))
    status = status_pb2.Status.FromString(details.raw_status)
    for where, message in (("message", details.message), ("status.message", status.message)):
        if request_id and details.reason == "INTERNAL":
            message = message.replace(request_id, "<own request id>")
        texts.append((where, message))
    texts.append(("ErrorInfo.domain", details.domain or ""))
    texts += [(f"ErrorInfo.metadata[{key}]", f"{key}={value}") for key, value in details.metadata.items()]
    texts += [
        (f"BadRequest[{field}]", f"{field}: {text}") for field, text in details.field_violations.items()
    ]
    for detail in status.details:
        if not any(detail.Is(kind.DESCRIPTOR) for kind in _KNOWN_DETAILS):  # DebugInfo and the like
            name = detail.TypeName()
            kind = getattr(error_details_pb2, name.rsplit(".", 1)[-1], None)
            if kind is not None and name.startswith("google.rpc."):
                unpacked = kind()
                detail.Unpack(unpacked)
                texts.append((name, text_format.MessageToString(unpacked)))
            else:
                texts.append((name, detail.value.decode("utf-8", "replace")))
    return Refusal(method, details.code.name, details.reason or "", tuple(texts))


class RefusalCollector(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps every non-OK status the channel receives (S7)."""

    def __init__(self) -> None:
        self.refusals: list[Refusal] = []

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        if outcome.code() != grpc.StatusCode.OK:
            self.refusals.append(_refusal(client_call_details.method, outcome))
        return outcome


@contextlib.contextmanager
def collecting_channel(address: str, collector: RefusalCollector) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as channel:
        yield grpc.intercept_channel(channel, collector)


def drive(address: str, collector: RefusalCollector) -> list[str]:
    """Every RPC, carrying every kind of secret, plus refusals (rate limits, bad keys, wrong codes,
    missing roles, a taken address, an ended session) that ``collector`` keeps.
    Returns the real secrets the service handed out on the way (session tokens, a challenge id)."""
    md = (("x-iam-api-key", API_KEY), ("x-request-id", "leak-test-0001"))
    client = common_pb2.ClientContext(
        ip="198.51.100.23", user_agent="Mozilla/5.0", device_id="dev_" + "a" * 22
    )
    with collecting_channel(address, collector) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        token = token_pb2_grpc.TokenServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        calls = [
            lambda: auth.Signup(
                auth_pb2.SignupRequest(
                    client=client, email=EMAIL, password=PASSWORD, name=NAME, terms_accepted=True
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
            lambda: auth.Logout(auth_pb2.LogoutRequest(), metadata=md),  # every field missing
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
    """The real tokens through refresh, a password change and a step-up, then the refusals that
    need a real account (a wrong code, a missing role, a taken address, an ended session); the
    secrets returned."""
    token = token_pb2_grpc.TokenServiceStub(channel)
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    mfa = mfa_pb2_grpc.MfaServiceStub(channel)
    here = common_pb2.ClientContext(ip=client.ip, user_agent=client.user_agent, device_id=session.device_id)
    rotated = token.Refresh(
        token_pb2.RefreshRequest(client=here, refresh_token=session.refresh_token), metadata=md
    )
    auth.ChangePassword(
        auth_pb2.ChangePasswordRequest(
            client=here,
            access_token=session.access_token,
            current_password=PASSWORD,
            new_password=NEW_PASSWORD,
        ),
        metadata=md,
    )
    challenge = mfa.StartStepUp(
        mfa_pb2.StartStepUpRequest(client=here, access_token=session.access_token, action="delete-account"),
        metadata=md,
    )
    elsewhere = common_pb2.ClientContext(ip="198.51.100.24", user_agent=client.user_agent)
    access = rotated.session.access_token
    refusals = [
        # codes nobody was sent: CODE_INVALID twice (unless CODE is the real one: once a million runs)
        *[
            lambda code=code: mfa.VerifyChallenge(
                mfa_pb2.VerifyChallengeRequest(client=here, challenge_id=challenge.challenge_id, code=code),
                metadata=md,
            )
            for code in (CODE, f"{(int(CODE) + 1) % 10**6:06d}")
        ],
        lambda: token.VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=access, required_roles=["admin"]), metadata=md
        ),
        lambda: auth.Login(
            auth_pb2.LoginRequest(client=elsewhere, email=EMAIL, password=WRONG_PASSWORD), metadata=md
        ),
        lambda: auth.Signup(
            auth_pb2.SignupRequest(
                client=elsewhere, email=EMAIL, password=NEW_PASSWORD, name=NAME, terms_accepted=True
            ),
            metadata=md,
        ),
        lambda: auth.RequestEmailChange(
            auth_pb2.RequestEmailChangeRequest(client=here, access_token=access, new_email=EMAIL),
            metadata=md,
        ),
        lambda: auth.Logout(
            auth_pb2.LogoutRequest(client=here, refresh_token=rotated.session.refresh_token), metadata=md
        ),
        lambda: token.ListSessions(token_pb2.ListSessionsRequest(access_token=access), metadata=md),
        lambda: token.Refresh(
            token_pb2.RefreshRequest(client=here, refresh_token=rotated.session.refresh_token), metadata=md
        ),
    ]
    for call in refusals:
        with contextlib.suppress(grpc.RpcError):
            call()
    return [rotated.session.refresh_token, rotated.session.access_token]


@dataclass(frozen=True)
class Driven:
    """What the leaky server answered, printed and logged while ``drive`` ran, and how it ended."""

    issued: list[str]
    refusals: list[Refusal]
    bug: grpc.StatusCode
    exit_code: int
    stdout: str
    stderr: str
    files: dict[str, str]


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> Driven:
    """`iam-grpc serve` at DEBUG with a failpoint bug, driven through every flow, then stopped."""
    folder = tmp_path_factory.mktemp("leaky")
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
        [IAM, "serve"], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(grpc_port, process)
        address = f"127.0.0.1:{grpc_port}"
        collector = RefusalCollector()
        issued = drive(address, collector)
        bug = grpc.StatusCode.OK
        with collecting_channel(address, collector) as channel:
            try:
                token_pb2_grpc.TokenServiceStub(channel).RevokeSession(
                    token_pb2.RevokeSessionRequest(access_token=ACCESS, session_id="s"),
                    metadata=(("x-iam-api-key", API_KEY),),
                )
            except grpc.RpcError as error:
                bug = error.code()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(15)
        stdout = process.stdout.read() if process.stdout else ""
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        stop(process)
    files = {p.name: p.read_text() for p in (folder / "var" / "logs").glob("*.log")}
    return Driven(issued, collector.refusals, bug, exit_code, stdout, stderr, files)


def test_no_secret_reaches_any_log_sink(driven: Driven) -> None:
    """Drive every RPC with secrets at DEBUG: stdout, stderr and every log file hold none of them (S49)."""
    assert len(driven.issued) >= 4  # signup's session and its rotation (the flows really ran)
    assert driven.bug == grpc.StatusCode.INTERNAL
    assert driven.exit_code == 0
    files = driven.files
    assert set(files) == {"app.log", "error.log", "access.log", "audit.log"}
    assert "RuntimeError" in files["error.log"]  # the failpoint's traceback is there...
    assert files["audit.log"]  # ...and the rate-limit block and caller denial were audited
    everything = driven.stdout + driven.stderr + "".join(files.values())
    for secret in [*SECRETS, *driven.issued]:
        assert secret not in everything, f"a secret reached the logs: {secret[:8]}…"
    assert CODE not in everything.replace("leak-test-0001", "")
    # nothing of the account's row either: its argon2 hash, its name, its address in any spelling
    assert leaked(everything, ["$argon2id$", NAME, *address_forms(EMAIL)]) == []
    for text in files.values():
        for line in text.splitlines():
            json.loads(line)  # every line is one JSON object
    request_lines = [json.loads(line) for line in driven.stdout.splitlines() if "leak-test-0001" in line]
    assert request_lines
    assert {r.get("request_id") for r in request_lines} == {"leak-test-0001"}


# What a caller must never read in an error (S7): addresses, anybody's user id (a ULID), a stack
# trace or exception, SQL, a file path.
FORBIDDEN_IN_ERRORS = {
    "email address": re.compile(r"[\w.%+-]+@[\w-]+(\.[\w-]+)+"),
    "user id (ULID)": re.compile(r"(?<![0-9a-z])[0-9A-HJKMNP-TV-Z]{26}(?![0-9a-z])", re.IGNORECASE),
    "stack trace": re.compile(r'Traceback|File "|\bline \d+, in\b'),
    "exception name": re.compile(r"\b[A-Z]\w*(Error|Exception)\b"),
    "SQL": re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE)\b"),
    "library or module name": re.compile(r"\b(sqlalchemy|asyncmy|aiosqlite|sqlite3|redis|iam_grpc)\b", re.I),
    "file path": re.compile(r"/[^\s/]*/|\\|\w\.py\b"),
}


def test_no_error_shows_an_address_a_user_id_sql_a_path_or_a_trace(driven: Driven) -> None:
    """S7: every non-OK status of the driven flows (and of the failpoint's INTERNAL bug): message,
    trailers, ErrorInfo domain and metadata, BadRequest violations and any other detail match none
    of FORBIDDEN_IN_ERRORS (the ULID pattern covers every user id), nor the account's address.

    Left out as the caller's own id (api.md: "Request metadata x-request-id is echoed in response
    metadata"; INTERNAL carries the "request id only"): the x-request-id trailer and that request id
    inside the INTERNAL message. Nothing else is excluded."""
    refusals = driven.refusals
    reasons = {r.reason for r in refusals}
    assert len(reasons) >= 8, sorted(reasons)  # so that the scan means something
    assert {
        "INVALID_ARGUMENT",
        "TOKEN_INVALID",
        "CHALLENGE_EXPIRED",
        "CODE_INVALID",
        "ROLE_REQUIRED",
        "INVALID_CREDENTIALS",
        "EMAIL_TAKEN",
        "RATE_LIMITED",
        "CALLER_UNKNOWN",
        "SESSION_REVOKED",
        "INTERNAL",
    } <= reasons, sorted(reasons)
    assert any(where.startswith("BadRequest[") for r in refusals for where, _ in r.texts)
    assert any(where.startswith("ErrorInfo.metadata[") for r in refusals for where, _ in r.texts)
    found = [
        f"{r.method} {r.reason} {where}: {name} in {text!r}"
        for r in refusals
        for where, text in r.texts
        for name, pattern in FORBIDDEN_IN_ERRORS.items()
        if pattern.search(text)
    ]
    local_part = EMAIL.split("@")[0]
    found += [
        f"{r.method} {r.reason} {where}: the account's address"
        for r in refusals
        for where, text in r.texts
        if local_part in text
    ]
    assert found == []


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
