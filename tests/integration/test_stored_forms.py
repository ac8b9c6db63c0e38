"""What is stored fits where it is stored (behaviour.md 2.1 and 10): the input rules check the forms
that reach the columns, not only the forms that arrive, on both backends.

Each value here was accepted by the rules and overflowed a MariaDB column (INTERNAL): a first
language tag longer than ``users.locale``; an internationalised address whose ASCII form is longer
than ``users.email_norm``; an IPv6 zone in a relayed ``client.ip``; a User-Agent whose version
number is longer than ``devices.browser_major``. SQLite stores any length, so there the same
values were stored as given. Refusals are checked before storage by
tests/integration/test_field_limits.py; the cases below are the ones that are accepted, in the form
that fits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from iam_grpc.core.validation import Violations, check_email
from iam_grpc.proto import auth_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import client, failure, new_email, signup
from tests.conftest import Backend

NO_LIMITS = '{"signup.ip": {"windows": ["1000/1s"]}, "signup.pair": {"windows": ["1000/1s"]}}'

# 38 characters: a well-formed tag (RFC 5646 syntax) longer than the 35 users.locale holds
LONG_TAG = "de-" + "-".join(["abcdefgh"] * 3) + "-abcdefgh"
# 64 + 1 + 4 labels of 16 distinct CJK characters + ".com": 136 characters as typed, 288 in the
# ASCII form that email_norm stores (each label becomes 54 characters of punycode)
IDN_LABEL = "中文域名测试例子网站地址长度增加"
IDN_EMAIL = "a" * 64 + "@" + ".".join([IDN_LABEL] * 4) + ".com"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": NO_LIMITS}
    async with running_service(tmp_path_factory.mktemp("stored-forms"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def test_the_idn_case_is_what_it_claims() -> None:
    """The address passes every rule on its typed form, and its ASCII form is over 254."""
    assert len(IDN_EMAIL) == 136
    assert len(LONG_TAG) == 38
    import idna

    assert len("a" * 64 + "@" + idna.encode(".".join([IDN_LABEL] * 4) + ".com").decode()) > 254


@pytest.mark.parametrize(
    ("accept_language", "stored"),
    [(f"{LONG_TAG}, de-CH;q=0.9", "de-CH"), (LONG_TAG, None), (f"{LONG_TAG[:35]},en", LONG_TAG[:35])],
    ids=["next-tag", "none-left", "35-characters"],
)
async def test_a_language_tag_longer_than_the_locale_column_is_passed_over(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, accept_language: str, stored: str | None
) -> None:
    """Accept-Language keeps its first tag that can be stored (35 characters at most); a longer one
    is not a usable locale, so signup succeeds with the next tag or none."""
    session = await signup(stub, context=client(accept_language=accept_language))
    async with iam.app.components.db.transaction(read_only=True) as tx:
        user = await tx.users.get(session.user_id)
    assert user is not None
    assert user.locale == stored


async def test_an_address_whose_ascii_form_is_too_long_is_refused_before_storage(
    stub: auth_pb2_grpc.AuthServiceStub,
) -> None:
    """136 characters as typed, 288 in the normalised form: INVALID_ARGUMENT naming email."""
    code, details = await failure(signup(stub, IDN_EMAIL))
    assert (code.name, details.reason, list(details.field_violations)) == (
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ["email"],
    )


async def test_an_address_at_the_limit_in_its_ascii_form_is_stored_whole(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """Both stored forms of an internationalised address of exactly 254 ASCII characters fit."""
    import idna

    local = new_email().split("@")[0]
    domain = ".".join([IDN_LABEL] * 3) + "." + "b" * 40 + ".com"
    address = local + "a" * (254 - len(local) - 1 - len(idna.encode(domain))) + "@" + domain
    parsed = check_email(Violations(), "email", address)
    assert parsed is not None
    assert len(parsed.norm) == 254
    session = await signup(stub, address)
    async with iam.app.components.db.transaction(read_only=True) as tx:
        user = await tx.users.get(session.user_id)
    assert user is not None
    assert (user.email, user.email_norm) == (parsed.display, parsed.norm)


@pytest.mark.parametrize(
    ("agent", "stored"),
    [
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/" + "9" * 40 + ".0",
            ("Firefox", "9" * 16, "Windows", "10"),
        ),
        (
            "Mozilla/5.0 (Android " + "7" * 40 + "; Mobile; rv:120.0) Gecko/120.0 Firefox/120.0",
            ("Firefox Mobile", "120", "Android", "7" * 16),
        ),
    ],
    ids=["browser", "os"],
)
async def test_a_version_number_longer_than_its_column_is_cut(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub, agent: str, stored: tuple[str, ...]
) -> None:
    """A User-Agent is never refused (2.1): a 40-digit version is kept as its first 16 digits, the
    width of devices.browser_major and os_major, and the device is stored with the whole agent."""
    session = await signup(stub, context=client(ua=agent))
    async with iam.app.components.db.transaction(read_only=True) as tx:
        device = await tx.devices.get(session.device_id)
    assert device is not None
    assert (device.browser_family, device.browser_major, device.os_family, device.os_major) == stored
    assert device.user_agent == agent


@pytest.mark.parametrize("ip", ["fe80::1%eth0", "fe80::1%" + "x" * 40, "::ffff:192.0.2.1%1"])
async def test_a_relayed_address_with_an_ipv6_zone_is_refused(
    stub: auth_pb2_grpc.AuthServiceStub, ip: str
) -> None:
    """A zone names an interface of the caller's host and is unbounded: not an end user's address."""
    code, details = await failure(signup(stub, new_email(), context=client(ip=ip)))
    assert (code.name, list(details.field_violations)) == ("INVALID_ARGUMENT", ["client.ip"])
