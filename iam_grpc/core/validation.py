"""Input rules (behaviour.md 2.1), checked before anything touches storage.

Every violation of one request is reported together as field violations
(INVALID_ARGUMENT). Input is never HTML-escaped on the way in and never
causes a ban.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.errors import FieldViolation, InvalidArgument
from iam_grpc.ids import DEVICE_ID

__all__ = ["ClientRules", "Violations", "clean_user_agent", "first_language_tag"]

ROLE_NAME = re.compile(r"^[a-z][a-z0-9:_-]{0,63}$")
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$")
MAX_USER_AGENT = 1024
MAX_ACCEPT_LANGUAGE = 256


@dataclass
class Violations:
    """Collects every problem of a request, then raises them together."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, name: str, description: str) -> None:
        self.items.append(FieldViolation(name, description))

    def raise_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def clean_user_agent(value: str) -> str:
    """Control characters removed, cut (not refused) at 1024 characters."""
    cleaned = "".join(ch for ch in value if unicodedata.category(ch) != "Cc")
    return cleaned[:MAX_USER_AGENT]


def first_language_tag(value: str) -> str:
    """The first syntactically valid language tag of an Accept-Language value, or ''."""
    for part in value[:MAX_ACCEPT_LANGUAGE].split(","):
        tag = part.split(";", 1)[0].strip()
        if _LANGUAGE_TAG.match(tag):
            return tag
    return ""


@dataclass(frozen=True, slots=True)
class ClientRules:
    """Checks of ``ClientContext``; ``ip_required`` when the caller's ``client.ip`` is believed."""

    ip_required: bool

    def check(
        self, violations: Violations, ip: str, user_agent: str, device_id: str, accept_language: str
    ) -> None:
        if self.ip_required and parse_ip(ip) is None:
            violations.add("client.ip", "must be an IPv4 or IPv6 address")
        if device_id and not DEVICE_ID.match(device_id):
            violations.add("client.device_id", "must be empty or a device id issued by this service")
        if len(accept_language) > MAX_ACCEPT_LANGUAGE:
            violations.add("client.accept_language", "must be at most 256 characters")


def check_roles(violations: Violations, name: str, roles: Sequence[str]) -> None:
    if len(roles) > 32:
        violations.add(name, "at most 32 roles")
    elif not all(ROLE_NAME.match(role) for role in roles):
        violations.add(name, "role names match ^[a-z][a-z0-9:_-]{0,63}$")
