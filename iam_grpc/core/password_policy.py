"""What a password typed by a person must look like (behaviour.md 2.1).

Two pure functions returning human-readable problems (an empty list means
fine), ready to become ``FieldViolation`` descriptions. A new password gets the
policy: length in code points after NFKC, a byte cap, and no email local part
or name inside it. There are no composition rules: they push people to
predictable patterns without making passwords stronger. A presented (login or
current) password only gets the size limits, which keep absurd input away from
argon2; it is never judged against a policy that may have changed since it
was set.

Lengths are measured after NFKC because that is what gets hashed
(``iam_grpc.core.passwords``): a password accepted as new must be accepted
again at login even if the keyboard sends it in another normal form. The
breached-password check needs I/O and lives elsewhere.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["LOGIN_MAX_LENGTH", "MAX_PASSWORD_BYTES", "login_password_problems", "new_password_problems"]

MAX_PASSWORD_BYTES = 512
LOGIN_MAX_LENGTH = 128
_PERSONAL_MIN_LENGTH = 4  # shorter local parts and names match too many passwords by chance


def new_password_problems(
    password: str, *, min_length: int, max_length: int, email: str, names: Sequence[str]
) -> list[str]:
    """Problems of a password chosen at signup, reset or change; ``names`` are the account's names."""
    text = unicodedata.normalize("NFKC", password)
    problems = _size_problems(text, min_length, max_length)
    folded = text.casefold()
    local_part = _normal(email.rpartition("@")[0] if "@" in email else email)
    if len(local_part) >= _PERSONAL_MIN_LENGTH and local_part.casefold() in folded:
        problems.append("must not contain the part of the email address before the @")
    for name in names:
        normal_name = _normal(name)
        if len(normal_name) >= _PERSONAL_MIN_LENGTH and normal_name.casefold() in folded:
            problems.append("must not contain your name")
            break
    return problems


def login_password_problems(password: str) -> list[str]:
    """Problems of a password presented to sign in or to confirm an action: size only."""
    return _size_problems(unicodedata.normalize("NFKC", password), 1, LOGIN_MAX_LENGTH)


def _size_problems(text: str, min_length: int, max_length: int) -> list[str]:
    problems: list[str] = []
    if any(0xD800 <= ord(char) <= 0xDFFF for char in text):
        problems.append("must be valid Unicode text")
    if len(text) < min_length:
        problems.append("is required" if min_length == 1 else f"must be at least {min_length} characters")
    elif len(text) > max_length:
        problems.append(f"must be at most {max_length} characters")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        problems.append(f"must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8")
    return problems


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()
