"""Field rules of the UserService admin requests and VerifyApiToken, checked before any lookup
(security.md S53): a malformed field is INVALID_ARGUMENT naming it, never a NOT_FOUND."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.core.validation import MAX_EMAIL, ROLE_NAME, Violations
from iam_grpc.ids import ULID_RE

__all__ = [
    "check_audit_kinds",
    "check_email_prefix",
    "check_page",
    "check_role",
    "check_since",
    "check_used_from",
    "check_user_id",
]

_KIND = re.compile(r"^[a-z][a-z0-9_.]{0,47}\Z")
_MAX_TOKEN = 512
_MAX_KINDS = 32


def check_user_id(violations: Violations, name: str, value: str) -> None:
    if not ULID_RE.match(value):
        violations.add(name, "must be a user id (26 characters, ULID)")


def check_role(violations: Violations, name: str, value: str, *, required: bool = True) -> None:
    if (value or required) and not ROLE_NAME.match(value):
        violations.add(name, "role names match ^[a-z][a-z0-9:_-]{0,63}$")


def check_page(violations: Violations, size: int, token: str) -> None:
    if not 0 <= size <= 1000:
        violations.add("page_size", "must be between 0 and 1000")
    if len(token) > _MAX_TOKEN:
        violations.add("page_token", "is not a token of this query")


def check_email_prefix(violations: Violations, value: str) -> None:
    if len(value) > MAX_EMAIL or any(ch.isspace() or ord(ch) < 32 for ch in value):
        violations.add("email_prefix", "must be at most 254 characters, without spaces or control characters")


def check_audit_kinds(violations: Violations, kinds: Sequence[str]) -> None:
    if len(kinds) > _MAX_KINDS:
        violations.add("kinds", "at most 32 kinds")
    elif not all(_KIND.match(kind) for kind in kinds):
        violations.add("kinds", "kinds look like login.success (lowercase, at most 48 characters)")


def check_since(violations: Violations, stamp: Timestamp | None) -> datetime | None:
    if stamp is None:
        return None
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        violations.add("since", "must be a valid time")
        return None


def check_used_from(violations: Violations, ip: str) -> None:
    if ip and parse_ip(ip) is None:
        violations.add("ip", "must be empty or an IPv4 or IPv6 address")
