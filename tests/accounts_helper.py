"""Calling the account RPCs the way a BFF does, and reading what the service mailed."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import grpc

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2
from iam_grpc.testing import ErrorDetails, error_details
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX

PASSWORD = "correct horse battery staple 42"
# Per-second bursts off, so that consecutive calls of a test are not refused for speed alone.
NO_BURSTS = {
    "signup.ip": {"windows": ["1000/1s"]},
    "signup.pair": {"windows": ["1000/1s"]},
    "login.ip": {"windows": ["1000/1s"]},
    "reset_request.ip": {"windows": ["1000/1s"]},
    "reset.ip": {"windows": ["1000/1s"]},
    "link_redeem.ip": {"windows": ["1000/1s"]},
    "change_password.ip": {"windows": ["1000/1s"]},
    "email_change.ip": {"windows": ["1000/1s"]},
}


def account_env(
    backend: Backend, mailbox: Mailbox, groups: dict[str, object] | None = None, **extra: str
) -> dict[str, str]:
    """A service environment for account-flow tests: mail to ``mailbox``, limits without bursts."""
    return {
        **backend.isolated(),
        "IAM_RATELIMIT__GROUPS": json.dumps({**NO_BURSTS, **(groups or {})}),
        "IAM_SMTP_URL": mailbox.url,
        "IAM_MAIL__POLL_INTERVAL": "100ms",
        **extra,
    }


def new_email() -> str:
    return f"user.{secrets.token_hex(5)}@example.com"


def client(
    ip: str = "203.0.113.10", ua: str = FIREFOX, device_id: str = "", accept_language: str = ""
) -> common_pb2.ClientContext:
    return common_pb2.ClientContext(
        ip=ip, user_agent=ua, device_id=device_id, accept_language=accept_language
    )


async def signup(
    stub: auth_pb2_grpc.AuthServiceStub,
    email: str | None = None,
    password: str = PASSWORD,
    *,
    context: common_pb2.ClientContext | None = None,
    name: str = "Ada",
    last_name: str = "Lovelace",
    terms: bool = True,
) -> common_pb2.Session:
    answer = await stub.Signup(
        auth_pb2.SignupRequest(
            client=context or client(),
            email=email or new_email(),
            password=password,
            name=name,
            last_name=last_name,
            terms_accepted=terms,
        )
    )
    return answer.session


async def failure(call: object) -> tuple[grpc.StatusCode, ErrorDetails]:
    """Await a call that must fail; its status code and rich details."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error_details(error)
    raise AssertionError("the call succeeded")


async def wait_for_mail(
    box: Mailbox, to: str, subject: str, *, count: int = 1, timeout: float = 10.0
) -> list[EmailMessage]:
    """The messages to ``to`` whose subject contains ``subject`` once there are ``count`` of them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [m for m in box.to(to) if subject.lower() in str(m["Subject"]).lower()]
        if len(found) >= count:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"no '{subject}' mail to {to}; got {[str(m['Subject']) for m in box.to(to)]}"
            )
        await asyncio.sleep(0.05)


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def link_token(message: EmailMessage) -> str:
    match = re.search(r"https?://\S+\?token=[\w.%-]+", text_of(message))
    assert match is not None, text_of(message)
    return parse_qs(urlsplit(match.group(0)).query)["token"][0]


def code_of(message: EmailMessage) -> str:
    match = re.search(r"Your code: (\d{6,8})\b", text_of(message))
    assert match is not None
    return match.group(1)
