"""Standard Webhooks signatures (https://www.standardwebhooks.com/): what a receiver verifies.

The signed content is ``<webhook-id>.<webhook-timestamp>.<body>``; the signature header holds
``v1,<base64 HMAC-SHA256>`` under the secret's key (``whsec_`` + base64; the prefix optional).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["PREFIX", "secret_key", "sign", "verify"]

PREFIX = "whsec_"
_MIN_KEY = 16


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret; ValueError when it is not one."""
    text = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 (optionally prefixed whsec_)") from None
    if len(key) < _MIN_KEY:
        raise ValueError(f"must decode to at least {_MIN_KEY} bytes")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(key: bytes, message_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """Whether any ``v1,`` signature of the (space separated) header matches."""
    expected = sign(key, message_id, timestamp, body)
    return any(hmac.compare_digest(candidate, expected) for candidate in header.split(" "))
