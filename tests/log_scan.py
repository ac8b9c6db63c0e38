"""Searching logs for a user's values in every spelling a log line could give them."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

import idna

from iam_grpc.core.validation import Violations, check_email


def address_forms(typed: str) -> list[str]:
    """Every spelling of an address a log could show: as typed, as stored (Unicode domain),
    normalised (ASCII domain), decomposed, in either case, URL-encoded, and its bare local part."""
    parsed = check_email(Violations(), "email", typed)
    assert parsed is not None
    local = parsed.display.partition("@")[0]
    forms = {
        typed,
        parsed.display,
        parsed.norm,
        f"{local}@{idna.decode(parsed.domain_ascii)}",
        unicodedata.normalize("NFD", parsed.display),
        local,
    }
    forms |= {form.lower() for form in forms} | {form.upper() for form in forms}
    forms |= {quote(form) for form in forms} | {quote(form, safe="") for form in forms}
    return sorted(forms)


def leaked(logs: str, values: list[str]) -> list[str]:
    """The values found in ``logs``, ignoring case."""
    lowered = logs.lower()
    return [value for value in values if value.lower() in lowered]
