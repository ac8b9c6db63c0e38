"""Device trust (behaviour.md 1.7): when a known device may skip the new-device challenge.

A device id is an identifier, not a credential, so trust is honoured only while
the request's coarse fingerprint (browser family, OS family, device type)
still matches the baseline recorded when the device was first seen or last
proved by MFA. A copied device cookie in another browser therefore earns
nothing, and neither does one sent with an empty or stripped User-Agent: every
field the baseline recorded must be present in the request, so leaving one out
is a difference, never a wildcard.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from iam_grpc.core.client import ParsedAgent
from iam_grpc.storage.records import UserDevice

__all__ = [
    "COARSE_FIELDS",
    "baseline_of",
    "coarse_value",
    "ever_trusted",
    "is_trusted",
    "matches_baseline",
]

COARSE_FIELDS = ("browser_family", "os_family", "device_type")
_BASELINE_FIELDS = (
    "browser_family",
    "browser_major",
    "os_family",
    "os_major",
    "device_type",
    "device_brand",
    "device_model",
)


def baseline_of(agent: ParsedAgent) -> dict[str, Any]:
    """The fields later compared (coarse ones here, the rest by the fingerprint check)."""
    return {name: getattr(agent, name) for name in _BASELINE_FIELDS if getattr(agent, name)}


def matches_baseline(baseline: dict[str, Any], agent: ParsedAgent) -> bool:
    """Coarse fingerprint equality, case-insensitive: every field recorded in the baseline is
    present in the request and equal. A field the request leaves out is a difference, never a
    wildcard, so an empty or stripped User-Agent matches no baseline that recorded one."""
    return all(
        coarse_value(getattr(agent, name)) == coarse_value(recorded)
        for name in COARSE_FIELDS
        if coarse_value(recorded := baseline.get(name))
    )


def coarse_value(value: Any) -> str:
    """A coarse field as compared: stripped, case-folded, ``""`` when missing."""
    if value is None or isinstance(value, bool):
        return ""
    return str(value).strip().casefold()


def is_trusted(link: UserDevice | None, agent: ParsedAgent, now: datetime, trust_idle: timedelta) -> bool:
    """Trusted now: trust granted and not revoked since, seen within ``trust_idle``, same coarse
    fingerprint."""
    if link is None or link.trusted_at is None:
        return False
    if link.trust_revoked_at is not None and link.trust_revoked_at >= link.trusted_at:
        return False
    if link.last_seen_at + trust_idle <= now:
        return False
    return matches_baseline(link.baseline, agent)


def ever_trusted(links: list[UserDevice]) -> bool:
    """Whether the user has had a trusted device at all (then new devices need MFA, 2.4 step 9)."""
    return any(link.trusted_at is not None for link in links)
