"""Identifier formats (behaviour.md section 0). Randomness only from ``secrets``."""

from __future__ import annotations

import base64
import re
import secrets
from datetime import datetime

from ulid import ULID

__all__ = [
    "CHALLENGE_ID",
    "DEVICE_ID",
    "GRANT_TOKEN",
    "JTI",
    "REFRESH_TOKEN",
    "REQUEST_ID",
    "ULID_RE",
    "b64url",
    "new_challenge_id",
    "new_device_id",
    "new_grant_token",
    "new_jti",
    "new_refresh_token",
    "new_ulid",
]

_B64 = r"[A-Za-z0-9_-]"
ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}\Z")
DEVICE_ID = re.compile(rf"^dev_{_B64}{{22}}\Z")
JTI = re.compile(rf"^{_B64}{{22}}\Z")
CHALLENGE_ID = re.compile(rf"^ch_{_B64}{{22}}\Z")
REFRESH_TOKEN = re.compile(rf"^iamr_{_B64}{{43}}\Z")
GRANT_TOKEN = re.compile(rf"^iamg_{_B64}{{43}}\Z")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}\Z")


def b64url(raw: bytes) -> str:
    """Unpadded base64url text."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_ulid(now: datetime) -> str:
    """A ULID whose time part is ``now`` (from the injected clock) and 80 random bits."""
    millis = int(now.timestamp() * 1000)
    return str(ULID.from_bytes(millis.to_bytes(6, "big") + secrets.token_bytes(10)))


def new_device_id() -> str:
    return "dev_" + b64url(secrets.token_bytes(16))


def new_jti() -> str:
    return b64url(secrets.token_bytes(16))


def new_challenge_id() -> str:
    return "ch_" + b64url(secrets.token_bytes(16))


def new_refresh_token() -> str:
    return "iamr_" + b64url(secrets.token_bytes(32))


def new_grant_token() -> str:
    return "iamg_" + b64url(secrets.token_bytes(32))
