"""S53 (security.md; behaviour.md 2.1): every field limit is enforced before storage is touched.

Each case sends one request in which every field is valid but one, which is oversize or
malformed. The answer must be INVALID_ARGUMENT whose ``BadRequest`` names exactly that field,
and the service's ``iam_sql_statements_total`` counter (GET /metrics on the ops listener) must
not move across the call.

The "valid but one" requests use a real account (its access token, device and a real password
reset link), so that a field check placed after a lookup shows up as SQL instead of hiding behind
an earlier refusal of the token or link.

Token fields whose refusal the design gives another reason (access tokens: 1.2 TOKEN_INVALID; a
refresh token at Refresh: S28 TOKEN_INVALID; a step-up grant: 4.6 CHALLENGE_EXPIRED) get that
reason instead, and no SQL either. Not covered, on purpose: ``client.user_agent`` (2.1: a long one
is cut, never refused) and the 512-byte cap of passwords (128 code points of at most 4 bytes cannot
pass it at the default ``passwords.max_length``).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message

from iam_grpc.ids import new_challenge_id
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import PASSWORD, link_token, new_email, signup, wait_for_mail
from tests.conftest import Backend
from tests.contract_helper import PENDING_FIELDS, SERVICE_MODULES, walked_as_unary
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX, NO_BACKGROUND_SQL

NEW_PASSWORD = "a different long passphrase 7"
IP = "203.0.113.10"
SOME_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # a well-formed user id of no one
USER_IDS = [
    ("empty", ""),
    ("malformed", "not-a-user"),
    ("oversize", "0" * 1000),
    ("lowercase", SOME_ID.lower()),
]
PAGE_TOKENS = [("garbage", "not-a-token"), ("oversize", "A" * 600)]

# Nothing but the calls under test may run SQL while the counter is read, so every background job
# that touches the database is pushed an hour away: the mail poller (a queued mail still wakes it at
# once, so the reset mail of the setup goes out), cleanup, the key-table reload, the deny-list
# replay and (``probe_interval`` below) the health probe's SELECT 1. The limiters are off: they are
# not under test, their refusals would answer before the field checks, and blocks are audited in SQL.
QUIET = {"IAM_RATELIMIT__ENABLED": "false", **NO_BACKGROUND_SQL}
PROBE_INTERVAL = 3600.0


def _request_types() -> dict[str, type[Message]]:
    """``Service/Method`` -> request class, for every RPC the iam.v1 protos declare and the server
    serves (tests/contract_helper.py)."""
    found: dict[str, type[Message]] = {}
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if walked_as_unary(service.name, method.name):
                    found[f"{service.name}/{method.name}"] = getattr(module, method.input_type.name)
    return found


REQUEST_TYPES = _request_types()


@dataclass(frozen=True)
class Account:
    """What a signed-in user's BFF holds: the valid values the cases start from."""

    email: str
    access_token: str
    device_id: str
    reset_link: str


def _token(prefix: str) -> str:
    """A well-formed refresh token or grant that the service never issued."""
    return prefix + secrets.token_urlsafe(32)


def _valid_fields(method: str, account: Account) -> dict[str, Any]:
    """A request to ``method`` that passes every field rule (client context as a dict)."""
    client = {"ip": IP, "user_agent": FIREFOX, "device_id": account.device_id, "accept_language": "en-GB"}
    signed_in = {"client": client, "access_token": account.access_token}
    return {
        "AuthService/Signup": lambda: {
            "client": client,
            "email": new_email(),
            "password": PASSWORD,
            "name": "Ada",
            "last_name": "Lovelace",
            "terms_accepted": True,
        },
        "AuthService/Login": lambda: {"client": client, "email": new_email(), "password": PASSWORD},
        "AuthService/Logout": lambda: {"client": client, "refresh_token": _token("iamr_")},
        "AuthService/RequestPasswordReset": lambda: {"client": client, "email": new_email()},
        "AuthService/ResetPassword": lambda: {
            "client": client,
            "link_token": account.reset_link,
            "new_password": NEW_PASSWORD,
        },
        "AuthService/ChangePassword": lambda: {
            **signed_in,
            "current_password": PASSWORD,
            "new_password": NEW_PASSWORD,
        },
        "AuthService/RequestEmailChange": lambda: {**signed_in, "new_email": new_email()},
        # a real link of another purpose: past the shape checks, refused only for its purpose
        "AuthService/ConfirmEmailChange": lambda: {"client": client, "link_token": account.reset_link},
        "TokenService/Refresh": lambda: {"client": client, "refresh_token": _token("iamr_")},
        "TokenService/VerifyAccessToken": lambda: {
            "access_token": account.access_token,
            "required_roles": ["user"],
        },
        "TokenService/RevokeSession": lambda: {
            "access_token": account.access_token,
            "session_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
        },
        "TokenService/RevokeAllSessions": lambda: {"access_token": account.access_token},
        "TokenService/ListSessions": lambda: {"access_token": account.access_token},
        "MfaService/VerifyChallenge": lambda: {
            "client": client,
            "challenge_id": new_challenge_id(),
            "code": "123456",
        },
        "MfaService/RedeemMagicLink": lambda: {"client": client, "link_token": account.reset_link},
        "MfaService/InspectMagicLink": lambda: {"link_token": account.reset_link},
        "MfaService/ResendChallenge": lambda: {"client": client, "challenge_id": new_challenge_id()},
        "MfaService/StartStepUp": lambda: {**signed_in, "action": "delete-account"},
        "MfaService/ConsumeStepUpGrant": lambda: {"grant_token": _token("iamg_"), "action": "delete-account"},
        "MfaService/StartPasskeyRegistration": lambda: dict(signed_in),
        "MfaService/FinishPasskeyRegistration": lambda: {
            **signed_in,
            "credential_json": "{}",
            "name": "Laptop",
        },
        "MfaService/ListPasskeys": lambda: dict(signed_in),
        "MfaService/DeletePasskey": lambda: {**signed_in, "passkey_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"},
        "MfaService/StartPasskeyLogin": lambda: {"client": client, "email": new_email()},
        "MfaService/FinishPasskeyLogin": lambda: {
            "client": client,
            "challenge_id": new_challenge_id(),
            "credential_json": "{}",
        },
        "AuthService/SignInWithIdToken": lambda: {
            "client": client,
            "provider": "acme",
            "id_token": "e30.e30.sig",
            "nonce": "n-0123456789",
        },
        "AuthService/LinkIdentity": lambda: {
            **signed_in,
            "provider": "acme",
            "id_token": "e30.e30.sig",
            "nonce": "n-0123456789",
        },
        "AuthService/UnlinkIdentity": lambda: {**signed_in, "provider": "acme"},
        "MfaService/EnrollTotp": lambda: signed_in,
        "MfaService/ConfirmTotp": lambda: {**signed_in, "enrollment_id": "te_" + "A" * 22, "code": "123456"},
        "MfaService/DisableTotp": lambda: {**signed_in, "step_up_grant": _token("iamg_")},
        "AuthService/RequestEmailVerification": lambda: signed_in,
        "UserService/GetMe": lambda: dict(signed_in),
        "UserService/UpdateProfile": lambda: {
            **signed_in,
            "name": "Ada",
            "last_name": "Lovelace",
            "locale": "en-GB",
            "update_mask": {"paths": ["name", "last_name", "locale"]},
        },
        "UserService/DeleteMyAccount": lambda: {**signed_in, "step_up_grant": _token("iamg_")},
        "ApiTokenService/CreateApiToken": lambda: {
            **signed_in,
            "name": "deploy script",
            "scopes": ["repo:read"],
            "allowed_cidrs": ["203.0.113.0/24"],
        },
        "ApiTokenService/ListApiTokens": lambda: dict(signed_in),
        "ApiTokenService/RevokeApiToken": lambda: {**signed_in, "token_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"},
        "ApiTokenService/RotateApiToken": lambda: {**signed_in, "token_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"},
        "ApiTokenService/VerifyApiToken": lambda: {
            "secret": "iam_pat_" + "A" * 38,
            "ip": IP,
            "required_scopes": ["repo:read"],
        },
        "UserService/GetUser": lambda: {"user_id": SOME_ID},
        "UserService/ListUsers": lambda: {
            "page_size": 10,
            "email_prefix": "ada",
            "role": "user",
            "status": 1,
        },
        "UserService/DisableUser": lambda: {"user_id": SOME_ID, "reason": "left the company"},
        "UserService/EnableUser": lambda: {"user_id": SOME_ID},
        "UserService/GrantRole": lambda: {"user_id": SOME_ID, "role": "admin"},
        "UserService/RevokeRole": lambda: {"user_id": SOME_ID, "role": "admin"},
        "UserService/DeleteUser": lambda: {"user_id": SOME_ID},
        "UserService/ExportUser": lambda: {"user_id": SOME_ID},
        "UserService/ListAuditEvents": lambda: {
            "user_id": SOME_ID,
            "kinds": ["login.success"],
            "since": {"seconds": 1_700_000_000},
            "page_size": 10,
        },
    }[method]()


@dataclass(frozen=True)
class Case:
    """``method`` called with one field (``client.ip``, ``email``, ...) set to ``value``."""

    method: str
    field: str
    label: str
    value: Any
    also: tuple[tuple[str, Any], ...] = ()  # other fields the value needs (still valid ones)

    @property
    def id(self) -> str:
        return f"{self.method.split('/')[1]}.{self.field}-{self.label}"

    def request(self, account: Account) -> Message:
        fields = _valid_fields(self.method, account)
        if self.field.startswith("client."):
            fields["client"] = {**fields["client"], self.field.removeprefix("client."): self.value}
        else:
            fields[self.field] = self.value
        fields.update(self.also)
        if "client" in fields:
            fields["client"] = common_pb2.ClientContext(**fields["client"])
        return REQUEST_TYPES[self.method](**fields)


def _cases(method: str, field: str, values: list[tuple[str, Any]]) -> list[Case]:
    return [Case(method, field, label, value) for label, value in values]


RPCS_WITH_CLIENT = [
    method for method, kind in REQUEST_TYPES.items() if "client" in kind.DESCRIPTOR.fields_by_name
]
# The loopback caller of these tests is trusted to relay client IPs (2.8), so client.ip is required.
CLIENT_VALUES = {
    "client.ip": [
        ("missing", ""),
        ("malformed", "300.1.2.3"),
        ("oversize", "1" * 1000),
        ("ipv6_zone", "fe80::1%" + "eth0" * 20),  # parses in Python; not an address to store
    ],
    "client.device_id": [("malformed", "dev_short"), ("oversize", "dev_" + "A" * 1000)],
    "client.accept_language": [("oversize", "en-GB," * 43)],  # 258 characters
}
EMAILS = [
    ("empty", ""),
    ("oversize", "a" * 60 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 63]) + ".com"),  # 256 characters
    ("local_part_oversize", "a" * 65 + "@example.com"),
    ("no_at", "ada.example.com"),
    ("two_ats", "ada@lovelace@example.com"),
    ("quoted_local_part", '"ada lovelace"@example.com'),
    ("single_label_domain", "ada@localhost"),
    ("numeric_tld", "ada@example.123"),
    ("label_with_leading_hyphen", "ada@-example.com"),
    ("label_oversize", "ada@" + "a" * 64 + ".com"),
    # 136 characters as typed, 288 in the ASCII (punycode) form that email_norm stores
    ("oversize_in_ascii_form", "a" * 64 + "@" + ".".join(["中文域名测试例子网站地址长度增加"] * 4) + ".com"),
]
NEW_PASSWORDS = [("empty", ""), ("too_short", "x" * 11), ("oversize", "x" * 129)]
PRESENTED_PASSWORDS = [("empty", ""), ("oversize", "x" * 129)]
NAMES = [
    ("oversize", "x" * 101),
    ("oversize_after_nfkc", "\ufdfa" * 6),  # 6 code points, 108 after NFKC
    ("control_character", "Ada\x07Lovelace"),
    ("format_character", "Ada\u202eLovelace"),
]
LINK_TOKENS = [
    ("empty", ""),
    ("not_jwt_shaped", "not-a-link"),
    ("two_segments", "abc.def"),
    ("oversize", "a" * 1500 + "." + "b" * 600 + ".c"),
    ("oversize_in_bytes", "é" * 700 + "." + "é" * 400 + ".c"),  # 1,103 characters, 2,203 bytes
]
GARBAGE_LINK = [("garbage_segments", "abc.def.ghi")]
CHALLENGE_IDS = [
    ("empty", ""),
    ("malformed", "ch_short"),
    ("wrong_prefix", "xx_" + "A" * 22),
    ("oversize", "ch_" + "A" * 1000),
]
REFRESH_TOKENS = [
    ("empty", ""),
    ("malformed", "not a token"),
    ("stored_hash_shape", "A" * 43),
    ("oversize", "iamr_" + "A" * 5000),
]
CREDENTIALS_JSON = [("empty", ""), ("oversize", "{" + " " * 33000 + "}")]
PROVIDERS = [("empty", ""), ("oversize", "p" * 33), ("odd_characters", "acme\n"), ("unicode", "аcme")]
ID_TOKENS = [("empty", ""), ("oversize", "e30." + "a" * 17000 + ".sig")]
NONCES = [("empty", ""), ("oversize", "n" * 513)]
PASSKEY_IDS = [("empty", ""), ("malformed", "not-a-passkey-id"), ("oversize", "0" * 1000)]
ACTIONS = [
    ("empty", ""),
    ("uppercase", "Delete-Account"),
    ("space", "delete account"),
    ("leading_hyphen", "-delete"),
    ("oversize", "a" * 65),
]

FIELD_CASES: list[Case] = [
    *(
        Case(method, field, label, value)
        for method in RPCS_WITH_CLIENT
        for field, values in CLIENT_VALUES.items()
        for label, value in values
    ),
    *_cases("AuthService/Signup", "email", EMAILS),
    *_cases("AuthService/Signup", "password", NEW_PASSWORDS),
    Case("AuthService/Signup", "password", "contains_last_name", "Lovelace forever and ever"),
    Case(
        "AuthService/Signup",
        "password",
        "contains_email_local_part",
        "ada.fieldlimits forever",
        also=(("email", "ada.fieldlimits@example.com"),),
    ),
    *_cases("AuthService/Signup", "name", [("empty", ""), ("blank", "   "), *NAMES]),
    *_cases("AuthService/Signup", "last_name", NAMES),
    *_cases("AuthService/Signup", "terms_accepted", [("not_accepted", False)]),
    *_cases("AuthService/Login", "email", EMAILS),
    *_cases("AuthService/Login", "password", PRESENTED_PASSWORDS),
    *_cases("AuthService/Logout", "refresh_token", REFRESH_TOKENS),
    *_cases("AuthService/RequestPasswordReset", "email", EMAILS),
    *_cases("AuthService/ResetPassword", "link_token", LINK_TOKENS + GARBAGE_LINK),
    *_cases("AuthService/ResetPassword", "new_password", NEW_PASSWORDS),
    *_cases("AuthService/ChangePassword", "current_password", PRESENTED_PASSWORDS),
    *_cases("AuthService/ChangePassword", "new_password", NEW_PASSWORDS),
    *_cases("AuthService/RequestEmailChange", "new_email", EMAILS),
    *_cases("AuthService/ConfirmEmailChange", "link_token", LINK_TOKENS + GARBAGE_LINK),
    *_cases(
        "TokenService/VerifyAccessToken",
        "required_roles",
        [
            ("too_many", [f"role-{i}" for i in range(33)]),
            ("uppercase", ["Admin"]),
            ("empty_name", [""]),
            ("oversize_name", ["a" * 65]),
        ],
    ),
    *_cases(
        "TokenService/RevokeSession",
        "session_id",
        [("malformed", "not-a-session-id"), ("oversize", "0" * 1000)],
    ),
    *_cases("MfaService/VerifyChallenge", "challenge_id", CHALLENGE_IDS),
    *_cases(
        "MfaService/VerifyChallenge",
        "code",
        [
            ("empty", ""),
            ("too_short", "12345"),
            ("too_long", "1234567"),
            ("not_digits", "12345a"),
            ("non_ascii_digits", "１２３４５６"),
            ("oversize", "1" * 1000),
        ],
    ),
    *_cases("MfaService/RedeemMagicLink", "link_token", LINK_TOKENS + GARBAGE_LINK),
    # a well-shaped token failing its signature answers usable = false (5.4), so only shapes here
    *_cases("MfaService/InspectMagicLink", "link_token", LINK_TOKENS),
    *_cases("MfaService/ResendChallenge", "challenge_id", CHALLENGE_IDS),
    *_cases("MfaService/StartStepUp", "action", ACTIONS),
    *_cases("MfaService/ConsumeStepUpGrant", "action", ACTIONS[1:]),
    *_cases("MfaService/FinishPasskeyRegistration", "credential_json", CREDENTIALS_JSON),
    *_cases("MfaService/FinishPasskeyRegistration", "name", [("empty", ""), ("blank", "   "), *NAMES]),
    *_cases("MfaService/DeletePasskey", "passkey_id", PASSKEY_IDS),
    *_cases("MfaService/StartPasskeyLogin", "email", EMAILS[1:]),  # empty: discoverable credentials
    *_cases("MfaService/FinishPasskeyLogin", "challenge_id", CHALLENGE_IDS),
    *_cases("MfaService/FinishPasskeyLogin", "credential_json", CREDENTIALS_JSON),
    *(
        Case("MfaService/VerifyChallenge", "passkey_assertion_json", label, value, also=(("code", ""),))
        for label, value in CREDENTIALS_JSON[1:]
    ),
    *(
        case
        for method in ("AuthService/SignInWithIdToken", "AuthService/LinkIdentity")
        for case in (
            *_cases(method, "provider", PROVIDERS),
            *_cases(method, "id_token", ID_TOKENS),
            *_cases(method, "nonce", NONCES),
        )
    ),
    *_cases("AuthService/UnlinkIdentity", "provider", PROVIDERS),
    *(
        Case("MfaService/VerifyChallenge", "recovery_code", label, value, also=(("code", ""),))
        for label, value in (
            ("too_short", "abcd-efgh"),
            ("ambiguous_letters", "abcd-efgh-ij0l"),
            ("non_ascii", "ａｂｃｄ-ｅｆｇｈ-ｊｋｍｎ"),
            ("newline", "abcd-efgh-jkm\n"),
            ("oversize", "a" * 1000),
        )
    ),
    Case("MfaService/VerifyChallenge", "recovery_code", "with_a_code", "abcd-efgh-jkmn"),
    *_cases(
        "MfaService/ConfirmTotp",
        "enrollment_id",
        [
            ("empty", ""),
            ("malformed", "te_short"),
            ("wrong_prefix", "xx_" + "A" * 22),
            ("oversize", "te_" + "A" * 999),
        ],
    ),
    *_cases(
        "MfaService/ConfirmTotp",
        "code",
        [
            ("empty", ""),
            ("too_short", "12345"),
            ("too_long", "1234567"),
            ("non_ascii_digits", "１２３４５６"),
        ],
    ),
    *_cases("MfaService/DisableTotp", "step_up_grant", [("empty", "")]),
    *_cases("UserService/UpdateProfile", "name", [("empty", ""), ("blank", "   "), *NAMES]),
    *_cases("UserService/UpdateProfile", "last_name", NAMES),
    *_cases(
        "UserService/UpdateProfile",
        "locale",
        [("oversize", "en-" + "abcdefgh-" * 5), ("malformed", "en_GB"), ("control_character", "en\x07")],
    ),
    *_cases(
        "UserService/UpdateProfile",
        "update_mask",
        [("empty", {"paths": []}), ("unknown_path", {"paths": ["email"]})],
    ),
    *_cases("ApiTokenService/CreateApiToken", "name", [("empty", ""), ("blank", "   "), *NAMES]),
    *_cases(
        "ApiTokenService/CreateApiToken",
        "scopes",
        [
            ("too_many", [f"scope-{i}" for i in range(33)]),
            ("uppercase", ["Repo:read"]),
            ("empty_name", [""]),
            ("oversize_name", ["a" * 65]),
            ("newline", ["repo\n"]),
        ],
    ),
    *_cases(
        "ApiTokenService/CreateApiToken",
        "allowed_cidrs",
        [
            ("malformed", ["203.0.113.0/33"]),
            ("not_an_address", ["example.com"]),
            ("too_many", [f"10.0.{i}.0/24" for i in range(33)]),
        ],
    ),
    Case("ApiTokenService/CreateApiToken", "ttl", "too_short", {"seconds": 30}),
    Case("ApiTokenService/CreateApiToken", "ttl", "negative", {"seconds": -60}),
    *_cases(
        "ApiTokenService/RevokeApiToken",
        "token_id",
        [("empty", ""), ("malformed", "tok"), ("oversize", "0" * 999)],
    ),
    *_cases(
        "ApiTokenService/RotateApiToken",
        "token_id",
        [("empty", ""), ("malformed", "tok"), ("oversize", "0" * 999)],
    ),
    *_cases("ApiTokenService/VerifyApiToken", "ip", [("malformed", "300.1.2.3"), ("oversize", "1" * 1000)]),
    *_cases(
        "ApiTokenService/VerifyApiToken",
        "required_scopes",
        [("too_many", [f"s{i}" for i in range(33)]), ("uppercase", ["Repo"]), ("empty_name", [""])],
    ),
    *_cases("UserService/GetUser", "user_id", USER_IDS),
    *_cases("UserService/GetUser", "email", EMAILS),
    *_cases("UserService/ListUsers", "page_size", [("negative", -1), ("oversize", 1001)]),
    *_cases("UserService/ListUsers", "page_token", PAGE_TOKENS),
    *_cases("UserService/ListUsers", "email_prefix", [("oversize", "a" * 255), ("newline", "ada\n")]),
    *_cases("UserService/ListUsers", "role", [("uppercase", "Admin"), ("oversize", "a" * 65)]),
    *_cases("UserService/ListUsers", "status", [("unknown", 99)]),
    *_cases("UserService/DisableUser", "user_id", USER_IDS),
    *_cases(
        "UserService/DisableUser", "reason", [("oversize", "x" * 501), ("control_character", "gone\x07")]
    ),
    *_cases("UserService/EnableUser", "user_id", USER_IDS),
    *_cases("UserService/GrantRole", "user_id", USER_IDS),
    *_cases("UserService/GrantRole", "role", [("empty", ""), ("uppercase", "Admin"), ("oversize", "a" * 65)]),
    *_cases("UserService/RevokeRole", "user_id", USER_IDS),
    *_cases(
        "UserService/RevokeRole", "role", [("empty", ""), ("uppercase", "Admin"), ("oversize", "a" * 65)]
    ),
    *_cases("UserService/DeleteUser", "user_id", USER_IDS),
    *_cases("UserService/ExportUser", "user_id", USER_IDS),
    *_cases("UserService/ListAuditEvents", "user_id", USER_IDS[1:]),
    *_cases(
        "UserService/ListAuditEvents",
        "kinds",
        [
            ("too_many", [f"k{i}" for i in range(33)]),
            ("uppercase", ["Login.success"]),
            ("oversize", ["a" * 49]),
        ],
    ),
    *_cases("UserService/ListAuditEvents", "since", [("beyond_year_9999", {"seconds": 253402300800})]),
    *_cases("UserService/ListAuditEvents", "page_size", [("negative", -1), ("oversize", 1001)]),
    *_cases("UserService/ListAuditEvents", "page_token", PAGE_TOKENS),
]

JWT_LIKE_OVERSIZE = "e30." + "a" * 5000 + ".sig"
TOKEN_CASES: list[tuple[Case, grpc.StatusCode, str]] = [
    *(
        (
            Case("TokenService/Refresh", "refresh_token", label, value),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )
        for label, value in REFRESH_TOKENS
    ),
    *(
        (Case(method, "access_token", label, value), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
        for method in (
            "AuthService/ChangePassword",
            "AuthService/RequestEmailChange",
            "TokenService/VerifyAccessToken",
            "TokenService/RevokeSession",
            "TokenService/RevokeAllSessions",
            "TokenService/ListSessions",
            "MfaService/StartStepUp",
            "MfaService/StartPasskeyRegistration",
            "MfaService/FinishPasskeyRegistration",
            "MfaService/ListPasskeys",
            "MfaService/DeletePasskey",
            "AuthService/LinkIdentity",
            "AuthService/UnlinkIdentity",
            "MfaService/EnrollTotp",
            "MfaService/ConfirmTotp",
            "MfaService/DisableTotp",
            "AuthService/RequestEmailVerification",
            "UserService/GetMe",
            "UserService/UpdateProfile",
            "UserService/DeleteMyAccount",
            "ApiTokenService/CreateApiToken",
            "ApiTokenService/ListApiTokens",
            "ApiTokenService/RevokeApiToken",
            "ApiTokenService/RotateApiToken",
        )
        for label, value in (("empty", ""), ("malformed", "not-a-jwt"), ("oversize", JWT_LIKE_OVERSIZE))
    ),
    *(
        (
            Case("MfaService/DisableTotp", "step_up_grant", label, value),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CHALLENGE_EXPIRED",
        )
        for label, value in (("malformed", "iamg_short"), ("oversize", "iamg_" + "A" * 5000))
    ),
    *(
        (
            Case("MfaService/ConsumeStepUpGrant", "grant_token", label, value),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CHALLENGE_EXPIRED",
        )
        for label, value in (("empty", ""), ("malformed", "iamg_short"), ("oversize", "iamg_" + "A" * 5000))
    ),
    *(
        (
            Case("UserService/DeleteMyAccount", "step_up_grant", label, value),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CHALLENGE_EXPIRED",
        )
        for label, value in (("empty", ""), ("malformed", "iamg_short"), ("oversize", "iamg_" + "A" * 5000))
    ),
    *(
        (
            Case("ApiTokenService/VerifyApiToken", "secret", label, value),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )
        for label, value in (
            ("empty", ""),
            ("malformed", "not-a-token"),
            ("bad_checksum", "iam_pat_" + "A" * 38),
            ("oversize", "iam_pat_" + "A" * 5000),
            ("newline", "iam_pat_" + "A" * 37 + "\n"),
        )
    ),
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = {
        **backend.isolated(),
        **QUIET,
        "IAM_SMTP_URL": mailbox.url,
        "IAM_RESET__RESPONSE_FLOOR": "50ms",  # only the setup's reset request waits for it
    }
    async with running_service(
        tmp_path_factory.mktemp("field-limits"), env, probe_interval=PROBE_INTERVAL
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(iam: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with iam.channel() as opened:
        yield opened


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def account(iam: RunningService, channel: grpc.aio.Channel, mailbox: Mailbox) -> Account:
    """A signed-up user with a fresh session and an unused password reset link."""
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    email = new_email()
    session = await signup(auth, email)
    await auth.RequestPasswordReset(
        auth_pb2.RequestPasswordResetRequest(
            client=common_pb2.ClientContext(ip=IP, user_agent=FIREFOX, device_id=session.device_id),
            email=email,
        )
    )
    [message] = await wait_for_mail(mailbox, email, "Reset your")
    await _settled(iam)
    return Account(email, session.access_token, session.device_id, link_token(message))


async def sql_statements(iam: RunningService) -> float:
    """``iam_sql_statements_total`` as the ops listener's GET /metrics reports it."""
    await (
        iam.app.components.audit.drain()
    )  # audit writes a call left running in the background are the call's
    assert iam.http_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", iam.http_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: iam\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    found = re.search(r"^iam_sql_statements_total (\S+)$", body.decode(), re.MULTILINE)
    assert found is not None, "iam_sql_statements_total is not exported"
    return float(found.group(1))


async def _settled(iam: RunningService, timeout: float = 10.0) -> None:
    """Wait until the setup's own SQL (the mail sender marking the reset mail sent) is over."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = await sql_statements(iam)
    while True:
        await asyncio.sleep(0.3)
        now = await sql_statements(iam)
        if now == last:
            return
        assert asyncio.get_running_loop().time() < deadline, "SQL keeps running with nothing to do"
        last = now


async def _outcome(
    channel: grpc.aio.Channel, iam: RunningService, case: Case, account: Account
) -> tuple[str, str | None, list[str], float]:
    """(status code name, ErrorInfo reason, violated fields, SQL statements run) of one call."""
    request = case.request(account)
    call = channel.unary_unary(
        f"/iam.v1.{case.method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )
    before = await sql_statements(iam)
    try:
        await call(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        code, reason, fields = error.code().name, details.reason, sorted(details.field_violations)
    else:
        code, reason, fields = grpc.StatusCode.OK.name, None, []
    return code, reason, fields, await sql_statements(iam) - before


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in FIELD_CASES])
async def test_a_field_over_its_limit_is_refused_before_storage(
    iam: RunningService, channel: grpc.aio.Channel, account: Account, case: Case
) -> None:
    """INVALID_ARGUMENT naming exactly that field in BadRequest, and no SQL statement ran."""
    assert await _outcome(channel, iam, case, account) == (
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        [case.field],
        0,
    )


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [pytest.param(case, code, reason, id=case.id) for case, code, reason in TOKEN_CASES],
)
async def test_a_malformed_token_is_refused_before_storage_with_its_documented_reason(
    iam: RunningService,
    channel: grpc.aio.Channel,
    account: Account,
    case: Case,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    """Access tokens (1.2), a refresh token at Refresh (S28) and grants (4.6): their reason, no SQL."""
    assert await _outcome(channel, iam, case, account) == (code.name, reason, [], 0)


def test_every_request_field_has_a_case() -> None:
    """Every field of every iam.v1 request has a case above (a boolean only if it has a rule), so a
    field added to the contract fails here until its limit is tested."""
    covered = {(case.method, case.field.split(".")[0]) for case in FIELD_CASES}
    covered |= {(case.method, case.field) for case, _, _ in TOKEN_CASES}
    missing = [
        f"{method}.{field.name}"
        for method, request_type in REQUEST_TYPES.items()
        for field in request_type.DESCRIPTOR.fields
        if (method, field.name) not in covered
        and field.type != field.TYPE_BOOL
        and f"{method}.{field.name}" not in PENDING_FIELDS
    ]
    assert missing == []


async def test_the_sql_counter_sees_a_lookup(
    iam: RunningService, channel: grpc.aio.Channel, account: Account
) -> None:
    """The measurement itself works: a valid Logout of an unknown token looks it up in SQL."""
    code, _, _, statements = await _outcome(
        channel, iam, Case("AuthService/Logout", "refresh_token", "unknown", _token("iamr_")), account
    )
    assert code == "OK"
    assert statements > 0
