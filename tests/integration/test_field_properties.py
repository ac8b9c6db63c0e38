"""A property test of field limits generated from the schema (behaviour.md 2.1 and 10, S53): every
request field whose value reaches a column gets values at and around that column's limits, and odd
text (newlines, zero-width, combining and format characters, NFKC expansions, characters of four
bytes in utf8mb4, IDN domains whose ASCII form is longer), against MariaDB through a real server.
The answer is a success or a refusal; never INTERNAL (nor UNKNOWN or UNAVAILABLE), and never the
database's own refusal of a value (the backstop's ``request`` violation): that would mean a form
that is stored was not checked by the input rules.

Which fields reach which columns is derived, not listed. The iam.v1 request descriptors give every
string field (ClientContext's included); storage/sql/tables.py gives every text column and its
length. A field reaches the columns of its own name, and of the names in ``STORED_AS`` where it is
stored under another name or in derived forms (an address's normalised form, the User-Agent's
parsed parts). A field added to the contract, or a column added under a request field's name, is
fuzzed with no change here (a method without a request builder fails the test until one is
written); ``test_the_derivation_finds_the_stored_fields`` pins what it finds today.

MariaDB only: SQLite stores any length, so there is no column limit to find. The examples run in
a worker thread (hypothesis drives a synchronous function) against the server on the test's
event loop. Every run tries, per field, a valid value as long as its stored form may be (accepted
where the request otherwise succeeds, which shows the examples reach the columns) and the values
just past each limit, then ``FUZZ_FIELDS_EXAMPLES`` generated ones (default 4: about 15 s in
``make test``); ``make fuzz-fields`` runs 500 per field.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import idna
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import String

from iam_grpc.ids import new_challenge_id, new_ulid
from iam_grpc.proto import auth_pb2_grpc, common_pb2
from iam_grpc.storage.sql.tables import metadata
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import PASSWORD, new_email, signup
from tests.conftest import Backend
from tests.integration.test_field_limits import REQUEST_TYPES
from tests.sessions_helper import FIREFOX, new_session

EXAMPLES = int(os.environ.get("FUZZ_FIELDS_EXAMPLES", "4"))

# Hypothesis notes any change of the global random state while it draws a value, as a strategy
# misusing `random`. Here the server runs on another thread and does move it (the email generator
# draws MIME boundaries from it), so that note is a false alarm; nothing in these strategies uses
# `random`.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)

# Request fields stored under other column names, or in forms derived from them (the leaf name of
# the field -> column names in storage/sql/tables.py). Every other field reaches the columns of
# its own name.
STORED_AS: dict[str, tuple[str, ...]] = {
    "email": ("email", "email_norm", "recipient"),
    "new_email": ("email", "email_norm", "recipient"),
    "accept_language": ("locale",),
    "ip": ("ip", "created_ip", "last_ip"),
    "user_agent": (
        "user_agent",
        "browser_family",
        "browser_major",
        "os_family",
        "os_major",
        "device_brand",
        "device_model",
        "device_type",
        "last_browser",
        "last_os",
    ),
}
CLIENT = common_pb2.ClientContext.DESCRIPTOR


def text_columns() -> dict[str, set[int]]:
    """Column name -> the lengths it has in any table (VARCHAR/CHAR of storage/sql/tables.py)."""
    found: dict[str, set[int]] = {}
    for table in metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, String) and column.type.length:
                found.setdefault(column.name, set()).add(column.type.length)
    return found


def stored_fields() -> dict[tuple[str, str], tuple[int, ...]]:
    """(``Service/Method``, field path) -> the lengths of the columns that field reaches."""
    columns = text_columns()
    out: dict[tuple[str, str], tuple[int, ...]] = {}
    for method, request_type in REQUEST_TYPES.items():
        paths: list[str] = []
        for field in request_type.DESCRIPTOR.fields:
            if field.message_type is CLIENT:
                paths += [f"{field.name}.{sub.name}" for sub in CLIENT.fields]
            elif field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
                paths.append(field.name)
        for path in paths:
            leaf = path.rsplit(".", 1)[-1]
            limits = {n for name in (leaf, *STORED_AS.get(leaf, ())) for n in columns.get(name, ())}
            if limits:
                out[(method, path)] = tuple(sorted(limits))
    return out


STORED = stored_fields()


def test_the_derivation_finds_the_stored_fields() -> None:
    """What the descriptors and tables give today: the four ClientContext fields of every RPC that
    has one, the addresses, the names and a session id (a lookup, fuzzed all the same)."""
    leaves = {path.rsplit(".", 1)[-1] for _, path in STORED}
    assert leaves == {
        "ip",
        "user_agent",
        "device_id",
        "accept_language",
        "email",
        "new_email",
        "name",
        "last_name",
        "session_id",
        "provider",
        "user_id",
        "locale",
    }
    assert STORED[("AuthService/Signup", "client.accept_language")] == (35,)
    assert STORED[("AuthService/Signup", "email")] == (254,)
    assert STORED[("AuthService/Signup", "client.user_agent")] == (16, 64, 1024)
    with_client = {m for m, k in REQUEST_TYPES.items() if "client" in k.DESCRIPTOR.fields_by_name}
    assert {m for m, p in STORED if p == "client.ip"} == with_client


# values ------------------------------------------------------------------------------------------

# odd characters: combining, zero-width, BOM, newlines and controls, NUL, a bidi override, NFKC
# expansions (U+FDFA is 18 characters after NFKC, a ligature 3), full-width, characters of 2, 3
# and 4 bytes in UTF-8 (4: outside the BMP), casing that grows (İ lowercases to 2 characters)
ODD = "é中😀𝔘\u0301\u200b\u200d\ufeff\n\r\t\x00\u202e\ufdfaﬃＡ '\"\\%İß@.;,-_"
TEXT = string.ascii_letters + string.digits + ODD
IDN_CHARS = "中文域名测试例子网站地址长度增加ü日本語ドメインбукваπ"


def sized(alphabet: str, low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(max(0, low), high).flatmap(
        lambda n: st.text(alphabet=alphabet, min_size=n, max_size=n)
    )


def around(limits: tuple[int, ...], alphabet: str = TEXT) -> st.SearchStrategy[str]:
    """Text of each limit's length give or take two, empty, one character, and twice the limit."""
    return st.one_of(
        *(sized(alphabet, limit - 2, limit + 2) for limit in limits),
        sized(alphabet, 0, 1),
        st.sampled_from(limits).flatmap(lambda limit: sized(alphabet, 2 * limit, 2 * limit)),
    )


def decorated(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A value, sometimes with something odd before, inside or after it."""
    return st.one_of(
        base,
        st.tuples(base, st.sampled_from(["\n", "\r\n", " ", "\u200b", "\x00", "%0a", "\u0301"])).map(
            lambda pair: pair[0] + pair[1]
        ),
        base.map(str.upper),
    )


def email_addresses() -> st.SearchStrategy[str]:
    """Addresses near 254 characters typed and in their ASCII form: long local parts, long ASCII
    labels, IDN labels whose punycode is three times longer."""
    atom = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
    local = st.one_of(sized(atom, 60, 66), sized(atom, 1, 10), sized(TEXT, 1, 66))
    ascii_label = sized(string.ascii_lowercase + string.digits + "-", 55, 65)
    idn_label = sized(IDN_CHARS, 10, 25)
    label = st.one_of(ascii_label, idn_label, sized(string.ascii_lowercase, 1, 10))
    domain = st.lists(label, min_size=2, max_size=5).map(".".join)
    return decorated(st.builds(lambda a, b: f"{a}@{b}", local, domain))


def ip_addresses() -> st.SearchStrategy[str]:
    v6 = st.ip_addresses(v=6)
    return decorated(
        st.one_of(
            st.ip_addresses().map(str),
            v6.map(lambda address: address.exploded),  # 39 characters
            st.ip_addresses(v=4).map(lambda a: f"0000:0000:0000:0000:0000:ffff:{a}"),  # 45 characters
            st.tuples(v6, sized(TEXT, 1, 50)).map(lambda pair: f"{pair[0]}%{pair[1]}"),  # zones
            around((45,)),
        )
    )


def device_ids() -> st.SearchStrategy[str]:
    b64 = string.ascii_letters + string.digits + "-_"
    return decorated(
        st.one_of(
            sized(b64, 22, 22).map(lambda tail: "dev_" + tail),
            sized(b64, 19, 25).map(lambda tail: "dev_" + tail),
            sized(TEXT, 22, 22).map(lambda tail: "dev_" + tail),
            around((26,)),
        )
    )


def language_values() -> st.SearchStrategy[str]:
    subtag = sized(string.ascii_letters + string.digits, 1, 8)
    tag = st.builds(
        lambda first, rest: "-".join([first, *rest]),
        sized(string.ascii_letters, 1, 8),
        st.lists(subtag, min_size=0, max_size=6),
    )
    header = st.lists(
        st.tuples(tag, st.sampled_from(["", ";q=0.9", ";q=0", ";q=x"])).map("".join), min_size=1, max_size=8
    ).map(",".join)
    return decorated(st.one_of(header, around((35, 256))))


def user_agents() -> st.SearchStrategy[str]:
    version = sized(string.digits, 1, 40)
    model = st.one_of(sized(string.ascii_letters + string.digits + " ", 55, 70), sized(TEXT, 1, 70))
    templates = st.one_of(
        st.builds(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{0}.0) Gecko/20100101 Firefox/{0}.0".format, version
        ),
        st.builds(
            "Mozilla/5.0 (Linux; Android {0}; {1} Build/QP1A) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/{2}.0.0.0 Mobile Safari/537.36".format,
            version,
            model,
            version,
        ),
        st.builds(
            "Mozilla/5.0 (iPhone; CPU iPhone OS {0}_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
            "Version/{0}.1 Mobile/15E148 Safari/604.1".format,
            version,
        ),
        st.builds("curl/{0}".format, version),
        st.builds("{0}Bot/{1} (+http://{0}.example/bot)".format, model, version),
    )
    return decorated(
        st.one_of(
            templates,
            around((16, 64, 1024)),
            st.builds(lambda pad, ua: pad + ua, sized(TEXT, 1000, 1030), templates),
        )
    )


def names() -> st.SearchStrategy[str]:
    return decorated(st.one_of(around((100,)), sized("\ufdfaﬃ中😀𝔘", 1, 101)))


def values_for(leaf: str, limits: tuple[int, ...]) -> st.SearchStrategy[str]:
    by_leaf: dict[str, Callable[[], st.SearchStrategy[str]]] = {
        "email": email_addresses,
        "new_email": email_addresses,
        "ip": ip_addresses,
        "device_id": device_ids,
        "accept_language": language_values,
        "user_agent": user_agents,
        "name": names,
        "last_name": names,
    }
    strategy = by_leaf.get(leaf)
    return strategy() if strategy is not None else decorated(around(limits))


def at_the_limit(leaf: str) -> str:
    """A valid value as long as its stored form can be (the explicit example of every field)."""
    if leaf in ("email", "new_email"):
        # 64 + 1 + 189 = 254 in the normalised form: three IDN labels of 54 punycode characters
        idn = ".".join(["中文域名测试例子网站地址长度增加"] * 3)
        filler = ("b" + secrets.token_hex(4)).ljust(254 - 1 - 64 - len(idna.encode(idn)) - 1 - 4, "x")
        return f"{'a' * 64}@{idn}.{filler}.com"
    return {
        "ip": "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
        "device_id": "dev_" + secrets.token_urlsafe(16)[:22],
        "accept_language": "de-" + "-".join(["abcdefgh"] * 3) + "-abcde, en",  # a 35-character tag
        "user_agent": "x" * 900
        + "Mozilla/5.0 (Android "
        + "7" * 40
        + "; Mobile; rv:120.0) Gecko/120.0 Firefox/"
        + "9" * 40,
        "name": "中" * 99 + "😀",
        "last_name": "é" * 100,
        "session_id": new_ulid(datetime.now(UTC)),
        "user_id": new_ulid(datetime.now(UTC)),
        "provider": "p" * 32,
        "locale": "zh-Hant-TW",
    }[leaf]


def just_over(leaf: str, limits: tuple[int, ...]) -> list[str]:
    """Values just past each limit, in the forms that used to slip through (a tag one and three
    characters over, an address whose ASCII form is one over, a zone in an address, a version or
    a device model one over its column), run on every run besides the generated ones."""
    top = max(limits)
    if leaf in ("email", "new_email"):
        idn = ".".join(["中文域名测试例子网站地址长度增加"] * 3)
        filler = "b" * (255 - 1 - 64 - len(idna.encode(idn)) - 1 - 4)  # the ASCII form is 255
        return [
            f"{'a' * 64}@{idn}.{filler}.com",
            "a" * 65 + "@example.com",
            "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".com",
        ]
    if leaf == "ip":
        return ["fe80::1%eth0", "fe80::1%" + "x" * 60, "::ffff:192.0.2.1%1", "1" * (top + 1)]
    if leaf == "accept_language":
        return ["a-" + "b" * 8 + "-c" * 12 + "-dd", "x-" + "-".join(["abcdefgh"] * 4), ",".join(["en"] * 90)]
    if leaf == "user_agent":
        return [
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:1.0) Gecko/20100101 Firefox/" + "9" * 17 + ".0",
            "Mozilla/5.0 (Android " + "7" * 17 + "; Mobile; rv:120.0) Gecko/120.0 Firefox/120.0",
            "Mozilla/5.0 (Linux; Android 10; " + "K" * 65 + " Build/QP1A) Chrome/120.0 Mobile Safari/537.36",
            "curl/" + "8" * 1024,
        ]
    if leaf in ("name", "last_name"):
        return ["x" * (top + 1), "\ufdfa" * 6, "中" * top + "\u0301"]
    return ["A" * (top + 1), "A" * top + "\n"]


# the service and the requests ----------------------------------------------------------------------

IP = "203.0.113.9"
FAKE_LINK = "eyJhbGciOiJIUzI1NiJ9.eyJ4IjoxfQ.c2lnbmF0dXJl"  # JWT-shaped, signed by nobody
NEW_PASSWORD = "another long passphrase 31"
# Never answers, whatever the input: a bug (INTERNAL, UNKNOWN) or a store that failed on a value.
NEVER = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}


@dataclass(frozen=True)
class World:
    """The service, the loop it runs on, and a signed-up account of the field under test (each
    field its own, so that challenges pending from one field's examples never refuse another's)."""

    iam: RunningService
    loop: asyncio.AbstractEventLoop
    email: str
    access_token: str
    device_id: str

    def fresh_refresh_token(self) -> tuple[str, str]:
        """A new session of a new user (refresh token, device id), made on the server's loop: each
        Refresh example needs an unused token, and a user without challenges pending."""
        made = asyncio.run_coroutine_threadsafe(
            new_session(self.iam.app, ip=IP, user_agent=FIREFOX), self.loop
        )
        _, issued = made.result(timeout=30)
        return issued.refresh_token, issued.device_id


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    shared_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = {
        **shared_backend.isolated(),
        # nothing but the inputs may refuse: no limits, room for many sessions and challenges
        "IAM_RATELIMIT__ENABLED": "false",
        "IAM_SESSIONS__MAX_PER_USER": "1000",
        "IAM_MFA__MAX_PENDING_PER_USER": "20",
        "IAM_RESET__RESPONSE_FLOOR": "1ms",
    }
    async with running_service(tmp_path_factory.mktemp("field-properties"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def world(iam: RunningService) -> World:
    email = new_email()
    async with iam.channel() as channel:
        session = await signup(auth_pb2_grpc.AuthServiceStub(channel), email)
    return World(iam, asyncio.get_running_loop(), email, session.access_token, session.device_id)


def base_request(method: str, world: World) -> dict[str, Any]:
    """A request to ``method`` that passes every rule and, where it can, succeeds and stores."""
    client = {"ip": IP, "user_agent": FIREFOX, "device_id": world.device_id, "accept_language": "en-GB"}
    signed_in = {"client": client, "access_token": world.access_token}
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "AuthService/Signup": lambda: {
            "client": {**client, "device_id": ""},
            "email": new_email(),
            "password": PASSWORD,
            "name": "Ada",
            "last_name": "Lovelace",
            "terms_accepted": True,
        },
        "AuthService/Login": lambda: {"client": client, "email": world.email, "password": PASSWORD},
        "AuthService/Logout": lambda: {"client": client, "refresh_token": "iamr_" + "u" * 43},
        "AuthService/RequestPasswordReset": lambda: {"client": client, "email": world.email},
        "AuthService/ResetPassword": lambda: {
            "client": client,
            "link_token": FAKE_LINK,
            "new_password": NEW_PASSWORD,
        },
        "AuthService/ChangePassword": lambda: {
            **signed_in,
            "current_password": "not the password 123",
            "new_password": NEW_PASSWORD,
        },
        "AuthService/RequestEmailChange": lambda: {**signed_in, "new_email": new_email()},
        "AuthService/ConfirmEmailChange": lambda: {"client": client, "link_token": FAKE_LINK},
        "TokenService/Refresh": lambda: dict(
            zip(("refresh_token", "client"), _refresh_parts(world, client), strict=True)
        ),
        "TokenService/RevokeSession": lambda: {
            "access_token": world.access_token,
            "session_id": new_ulid(datetime.now(UTC)),
        },
        "MfaService/VerifyChallenge": lambda: {
            "client": client,
            "challenge_id": new_challenge_id(),
            "code": "123456",
        },
        "MfaService/RedeemMagicLink": lambda: {"client": client, "link_token": FAKE_LINK},
        "MfaService/ResendChallenge": lambda: {"client": client, "challenge_id": new_challenge_id()},
        "MfaService/StartStepUp": lambda: {**signed_in, "action": "export"},
        "MfaService/StartPasskeyRegistration": lambda: dict(signed_in),
        "MfaService/FinishPasskeyRegistration": lambda: {**signed_in, "credential_json": "{}", "name": "Key"},
        "MfaService/ListPasskeys": lambda: dict(signed_in),
        "MfaService/DeletePasskey": lambda: {**signed_in, "passkey_id": new_ulid(datetime.now(UTC))},
        "MfaService/StartPasskeyLogin": lambda: {"client": client, "email": world.email},
        "MfaService/FinishPasskeyLogin": lambda: {
            "client": client,
            "challenge_id": new_challenge_id(),
            "credential_json": "{}",
        },
        "AuthService/SignInWithIdToken": lambda: {
            "client": client,
            "provider": "acme",
            "id_token": FAKE_LINK,
            "nonce": "nonce-1",
        },
        "AuthService/LinkIdentity": lambda: {
            **signed_in,
            "provider": "acme",
            "id_token": FAKE_LINK,
            "nonce": "nonce-1",
        },
        "AuthService/UnlinkIdentity": lambda: {**signed_in, "provider": "acme"},
        "AuthService/RequestEmailVerification": lambda: dict(signed_in),
        "MfaService/EnrollTotp": lambda: dict(signed_in),
        "MfaService/ConfirmTotp": lambda: {**signed_in, "enrollment_id": "te_" + "A" * 22, "code": "123456"},
        "MfaService/DisableTotp": lambda: {**signed_in, "step_up_grant": "iamg_" + "g" * 43},
        "UserService/GetMe": lambda: dict(signed_in),
        "UserService/UpdateProfile": lambda: {
            **signed_in,
            "name": "Ada",
            "last_name": "Lovelace",
            "locale": "en-GB",
            "update_mask": {"paths": ["name", "last_name", "locale"]},
        },
        "UserService/DeleteMyAccount": lambda: {**signed_in, "step_up_grant": "iamg_" + "g" * 43},
        "ApiTokenService/CreateApiToken": lambda: {
            **signed_in,
            "name": "deploy script",
            "scopes": ["repo:read"],
        },
        "ApiTokenService/ListApiTokens": lambda: dict(signed_in),
        "ApiTokenService/RevokeApiToken": lambda: {**signed_in, "token_id": new_ulid(datetime.now(UTC))},
        "ApiTokenService/RotateApiToken": lambda: {**signed_in, "token_id": new_ulid(datetime.now(UTC))},
        "ApiTokenService/VerifyApiToken": lambda: {"secret": "iam_pat_" + "A" * 38, "ip": IP},
        # admin RPCs: an id no user has (a real one would be disabled or erased under the world)
        "UserService/GetUser": lambda: {"user_id": new_ulid(datetime.now(UTC))},
        "UserService/DisableUser": lambda: {"user_id": new_ulid(datetime.now(UTC)), "reason": "left"},
        "UserService/EnableUser": lambda: {"user_id": new_ulid(datetime.now(UTC))},
        "UserService/GrantRole": lambda: {"user_id": new_ulid(datetime.now(UTC)), "role": "admin"},
        "UserService/RevokeRole": lambda: {"user_id": new_ulid(datetime.now(UTC)), "role": "admin"},
        "UserService/DeleteUser": lambda: {"user_id": new_ulid(datetime.now(UTC))},
        "UserService/ExportUser": lambda: {"user_id": new_ulid(datetime.now(UTC))},
        "UserService/ListAuditEvents": lambda: {"user_id": new_ulid(datetime.now(UTC)), "page_size": 10},
    }
    if method not in builders:
        pytest.fail(f"{method} has a stored field and no request builder here: add one", pytrace=False)
    return builders[method]()


def _refresh_parts(world: World, client: dict[str, str]) -> tuple[str, dict[str, str]]:
    token, device = world.fresh_refresh_token()
    return token, {**client, "device_id": device}


def request_with(method: str, path: str, value: str, world: World) -> Message:
    fields = base_request(method, world)
    if path.startswith("client."):
        fields["client"] = {**fields["client"], path.removeprefix("client."): value}
    else:
        fields[path] = value
    if "client" in fields:
        fields["client"] = common_pb2.ClientContext(**fields["client"])
    return REQUEST_TYPES[method](**fields)


@dataclass(frozen=True)
class Outcome:
    code: str
    reason: str
    fields: tuple[str, ...]


def call(channel: grpc.Channel, method: str, request: Message) -> Outcome:
    stub = channel.unary_unary(
        f"/iam.v1.{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )
    try:
        stub(request, timeout=30)
    except grpc.RpcError as error:
        details = error_details(error)
        return Outcome(details.code.name, details.reason or "", tuple(sorted(details.field_violations)))
    return Outcome("OK", "", ())


def succeeds_at_the_limit(method: str, path: str) -> bool:
    """Where the request builder succeeds, a valid value at the limit must be stored, not refused
    (the explicit example proves the fuzzing reaches the columns). RequestEmailChange and
    StartStepUp need their token's own device; the rest refuse a made-up link or challenge."""
    if method in ("AuthService/Signup", "AuthService/Login", "AuthService/RequestPasswordReset"):
        return method != "AuthService/Login" or path.startswith("client.")
    if method == "TokenService/Refresh":
        return True
    if method in ("AuthService/RequestEmailChange", "MfaService/StartStepUp"):
        return path != "client.device_id"
    return method == "TokenService/RevokeSession"


@pytest.mark.parametrize(("method", "path"), sorted(STORED), ids=lambda part: part.split("/")[-1])
async def test_a_stored_field_at_and_around_its_limits_never_fails_on_our_side(
    world: World, method: str, path: str
) -> None:
    """INVALID_ARGUMENT or an answer (a success, or a refusal the contract names), never INTERNAL,
    never the database refusing a value; at the limit, a valid value is accepted where it is
    stored."""
    leaf, limits = path.rsplit(".", 1)[-1], STORED[(method, path)]
    boundary = at_the_limit(leaf)
    outcomes: dict[str, Outcome] = {}

    with grpc.insecure_channel(world.iam.address) as channel:

        def answers_without_failing_on_our_side(value: str) -> None:
            outcome = call(channel, method, request_with(method, path, value, world))
            outcomes[value] = outcome
            assert outcome.code not in NEVER, (method, path, value, outcome)
            assert "request" not in outcome.fields, (method, path, value, outcome)

        run = answers_without_failing_on_our_side
        for value in (boundary, *just_over(leaf, limits)):  # explicit examples run every time
            run = example(value=value)(run)
        run = given(value=values_for(leaf, limits))(run)
        run = settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(run)
        await asyncio.to_thread(run)

    if succeeds_at_the_limit(method, path):
        assert outcomes[boundary].code == "OK", (boundary, outcomes[boundary])
