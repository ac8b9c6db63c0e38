"""Signup's outside lookups against local stand-ins (behaviour.md 2.3 steps 4-5): the MX check on a
real DNS server and the breached-password range API on a real HTTP server, with their failures
failing open, and the secrets that must never reach a log."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from loguru import logger

from iam_grpc.proto import auth_pb2, auth_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import PASSWORD, client, failure, new_email, signup
from tests.conftest import Backend
from tests.dns_server import SILENT, DnsServer
from tests.hibp_server import RangeServer

BREACHED = "hunter2 but much longer 99"
GROUPS = '{"signup.ip": {"windows": ["1000/1s"]}, "signup.pair": {"windows": ["1000/1s"]}}'
ZONE = {
    "example.com": {"MX": ["10 mx.example.com."]},
    "a-only.example": {"A": ["192.0.2.25"]},
    "no-mail.example": {"TXT": ['"v=spf1 -all"']},
    "slow.example": SILENT,
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def ranges() -> Iterator[RangeServer]:
    server = RangeServer()
    server.start()
    server.add(BREACHED, 1234)
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, dns: DnsServer, ranges: RangeServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = {
        **backend.isolated(),
        "IAM_RATELIMIT__GROUPS": GROUPS,
        "IAM_MX_CHECK": "true",
        "IAM_DNS_NAMESERVERS": dns.nameserver,
        "IAM_EMAIL_CHECKS__MX_TIMEOUT": "300ms",
        "IAM_HIBP_MODE": "online",
        "IAM_HIBP__URL": ranges.url,
        "IAM_HIBP__TIMEOUT": "300ms",
    }
    async with running_service(tmp_path_factory.mktemp("checks"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


async def test_domains_that_receive_mail_pass(stub: auth_pb2_grpc.AuthServiceStub, dns: DnsServer) -> None:
    """An MX record, or only an A record (implicit MX), lets signup through; the server was asked."""
    for domain in ("example.com", "a-only.example"):
        await signup(stub, f"someone.{len(dns.queries)}@{domain}")
    assert dns.queries_for("a-only.example")


@pytest.mark.parametrize("domain", ["no-mail.example", "nowhere.example"])
async def test_domains_without_mail_records_are_rejected(
    stub: auth_pb2_grpc.AuthServiceStub, domain: str
) -> None:
    """No MX/A/AAAA, or NXDOMAIN: EMAIL_DOMAIN_REJECTED."""
    code, details = await failure(signup(stub, f"someone@{domain}"))
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EMAIL_DOMAIN_REJECTED")


async def test_an_unanswered_lookup_fails_open_and_is_counted(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """A DNS timeout lets signup pass and increments iam_mx_unknown_total{kind="timeout"}."""
    await signup(stub, "someone@slow.example")
    assert 'iam_mx_unknown_total{kind="timeout"} 1.0' in iam.app.metrics.render().decode()


async def test_a_breached_password_is_refused_and_only_a_prefix_leaves(
    stub: auth_pb2_grpc.AuthServiceStub, ranges: RangeServer
) -> None:
    """PASSWORD_BREACHED; the range server saw a 5-character prefix with Add-Padding, nothing more."""
    code, details = await failure(signup(stub, password=BREACHED))
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PASSWORD_BREACHED")
    request = ranges.requests[-1]
    assert len(request.path.rsplit("/", 1)[1]) == 5
    assert request.headers.get("add-padding") == "true"


@pytest.mark.parametrize("form", ["", "/", "/range", "/range/"])
async def test_iam_hibp_url_is_taken_as_the_base_or_the_range_path(
    backend: Backend, ranges: RangeServer, tmp_path: Path, form: str
) -> None:
    """IAM_HIBP_URL as api.md writes it (the base: requests go to <url>/range/<5 hex>) or as the
    default spells it (the range path itself): either way the local range server is asked at
    /range/<prefix> and the breached password is refused."""
    base = ranges.url.removesuffix("/range/")
    env = {
        **backend.isolated(),
        "IAM_RATELIMIT__GROUPS": GROUPS,
        "IAM_HIBP_MODE": "online",
        "IAM_HIBP_URL": base + form,
        "IAM_HIBP__TIMEOUT": "1s",
    }
    before = len(ranges.requests)
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        code, details = await failure(signup(auth_pb2_grpc.AuthServiceStub(channel), password=BREACHED))
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PASSWORD_BREACHED")
    [request] = ranges.requests[before:]
    assert re.fullmatch(r"/range/[0-9A-F]{5}", request.path)


async def test_an_unreachable_range_api_fails_open_and_is_counted(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, ranges: RangeServer
) -> None:
    """With the API answering 503, a signup passes (hibp.fail_open) and the failure is counted."""
    ranges.mode = "status"
    try:
        await signup(stub, password="an unlisted passphrase 31")
    finally:
        ranges.mode = "normal"
    assert 'iam_hibp_failures_total{kind="status"} 1.0' in iam.app.metrics.render().decode()


async def test_passwords_and_tokens_never_reach_the_logs(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """Across signup, failed and successful logins, nothing logged holds the password or a token."""
    lines: list[str] = []
    sink = logger.add(
        lambda message: lines.append(str(message) + str(message.record["extra"])), level="DEBUG"
    )
    try:
        email = new_email()
        session = await signup(stub, email)
        login = auth_pb2.LoginRequest(
            client=client(device_id=session.device_id), email=email, password=PASSWORD
        )
        answer = await stub.Login(login)
        await failure(
            stub.Login(auth_pb2.LoginRequest(client=client(), email=email, password="wrong " + PASSWORD))
        )
    finally:
        logger.remove(sink)
    logged = "\n".join(lines)
    assert lines
    for secret in (PASSWORD, session.refresh_token, session.access_token, answer.session.refresh_token):
        assert secret not in logged
