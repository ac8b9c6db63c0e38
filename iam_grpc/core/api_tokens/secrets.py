"""The shape of a personal API token's secret: ``iam_pat_`` (a fixed prefix secret scanners can
match), 32 random base62 characters, and a 6-character base62 CRC-32 of what precedes it, so a
mistyped or truncated secret is refused without a lookup (the GitHub token layout)."""

from __future__ import annotations

import re
import secrets
import zlib

__all__ = ["PREFIX", "SECRET_LENGTH", "display_prefix", "new_secret", "well_formed"]

PREFIX = "iam_pat_"
_BODY = 32
_CHECK = 6
SECRET_LENGTH = len(PREFIX) + _BODY + _CHECK
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHAPE = re.compile(rf"^{PREFIX}[0-9A-Za-z]{{{_BODY + _CHECK}}}\Z")


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(text: str) -> str:
    return _base62(zlib.crc32(text.encode("ascii")), _CHECK)


def new_secret() -> str:
    """A fresh secret (about 190 random bits)."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY))
    return PREFIX + body + _checksum(PREFIX + body)


def well_formed(secret: str) -> bool:
    """The prefix, the length, the alphabet and the checksum hold."""
    if len(secret) != SECRET_LENGTH or not _SHAPE.match(secret):
        return False
    head = secret[:-_CHECK]
    return secrets.compare_digest(_checksum(head), secret[-_CHECK:])


def display_prefix(secret: str) -> str:
    """What lists show of a secret: the fixed prefix and four characters."""
    return secret[: len(PREFIX) + 4]
