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

__all__ = [
    "ClientRules",
    "EmailAddress",
    "Violations",
    "check_email",
    "check_name",
    "clean_user_agent",
    "first_language_tag",
]

ROLE_NAME = re.compile(r"^[a-z][a-z0-9:_-]{0,63}\Z")
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*\Z")
MAX_USER_AGENT = 1024
MAX_ACCEPT_LANGUAGE = 256
# The stored forms' limits (behaviour.md 10: users.locale, users.email and users.email_norm): what
# is stored is checked, not only what arrived. RFC 5646 4.4.1 sizes a language tag at 35 characters.
MAX_LANGUAGE_TAG = 35
MAX_EMAIL = 254


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
    """The first syntactically valid language tag of an Accept-Language value, or ''. A tag longer
    than ``MAX_LANGUAGE_TAG`` is not one we can store (nor a template locale): the next one is tried."""
    for part in value[:MAX_ACCEPT_LANGUAGE].split(","):
        tag = part.split(";", 1)[0].strip()
        if len(tag) <= MAX_LANGUAGE_TAG and _LANGUAGE_TAG.match(tag):
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


# RFC 5322 dot-atom text: printable ASCII without spaces, quotes, parentheses or the other specials.
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class EmailAddress:
    """An address as stored (local part as entered, domain lowercased) and its normalised form.

    ``norm`` is fully lowercased with the domain in its ASCII (IDNA 2008) form, so Unicode and
    punycode spellings of one domain, and case variants, share one account and one limit key.
    """

    display: str
    norm: str
    domain_ascii: str


def check_email(violations: Violations, name: str, raw: str) -> EmailAddress | None:
    """behaviour.md 2.1: trimmed, NFKC, 254/64 characters, dot-atom local part, IDNA 2008 domain."""
    text = unicodedata.normalize("NFKC", raw).strip()
    problem = _email_problem(text)
    if problem is not None:
        violations.add(name, problem)
        return None
    local, domain = text.split("@")
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        violations.add(name, "the domain is not a valid internet domain")
        return None
    address = EmailAddress(f"{local}@{domain.lower()}", f"{local.lower()}@{ascii_domain}", ascii_domain)
    # Both stored forms must fit: an internationalised domain grows in its ASCII (punycode) form,
    # and lowercasing can lengthen a Unicode domain.
    if max(len(address.display), len(address.norm)) > MAX_EMAIL:
        violations.add(name, "must be at most 254 characters, with the domain in its ASCII form")
        return None
    return address


def _email_problem(text: str) -> str | None:
    if not text:
        return "is required"
    if len(text) > MAX_EMAIL:
        return "must be at most 254 characters"
    if text.count("@") != 1:
        return "must contain exactly one @"
    local, domain = text.split("@")
    if not local or len(local) > 64:
        return "the part before @ must be 1-64 characters"
    if not _LOCAL_PART.match(local):
        return (
            "the part before @ may hold letters, digits, dots (not first, last or doubled)"
            " and !#$%&'*+/=?^_`{|}~-"
        )
    if not domain:
        return "the domain is missing"
    return None


def _ascii_domain(domain: str) -> str | None:
    """The IDNA 2008 ASCII form, lowercased; None unless it has 2+ valid labels and a non-numeric TLD."""
    import idna  # IDNA 2008 (the standard library's codec is IDNA 2003)

    try:
        ascii_domain = idna.encode(domain.rstrip(".").lower(), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or len(ascii_domain) > 253:
        return None
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return None
    return ascii_domain


def check_name(violations: Violations, name: str, raw: str, *, required: bool) -> str:
    """NFKC; 1-100 code points (0-100 when optional); no control or format characters."""
    text = unicodedata.normalize("NFKC", raw).strip()
    if required and not text:
        violations.add(name, "is required")
    elif len(text) > 100:
        violations.add(name, "must be at most 100 characters")
    elif any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text):
        violations.add(name, "must not contain control or formatting characters")
    return text


def check_roles(violations: Violations, name: str, roles: Sequence[str]) -> None:
    if len(roles) > 32:
        violations.add(name, "at most 32 roles")
    elif not all(ROLE_NAME.match(role) for role in roles):
        violations.add(name, "role names match ^[a-z][a-z0-9:_-]{0,63}$")
