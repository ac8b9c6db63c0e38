"""Every pattern of the package matches the whole input: ``$`` also matches before a trailing
newline, so ``^...$`` let ``mallory\\n@example.com`` through validation (behaviour.md 2.1)."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

import iam_grpc
import iam_grpc_client
from iam_grpc import ids
from iam_grpc.core import validation
from iam_grpc.core.mfa import step_up
from iam_grpc.core.ratelimit import groups
from iam_grpc.core.tokens import access

PACKAGE = Path(iam_grpc.__file__).parent
CLIENT_PACKAGE = Path(iam_grpc_client.__file__).parent
_RE_CALLS = {"compile", "match", "search", "fullmatch", "sub", "subn", "split", "findall", "finditer"}


def _pattern_literals() -> list[tuple[str, int, str]]:
    """(file, line, pattern text) for every literal pattern handed to the ``re`` module."""
    found: list[tuple[str, int, str]] = []
    paths = {path: path.relative_to(PACKAGE) for path in PACKAGE.rglob("*.py")}
    paths |= {path: path.relative_to(CLIENT_PACKAGE.parent) for path in CLIENT_PACKAGE.rglob("*.py")}
    for path, name in sorted(paths.items()):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re"
                and node.func.attr in _RE_CALLS
                and node.args
            ):
                continue
            text = _literal(node.args[0])
            if text is not None:
                found.append((str(name), node.lineno, text))
    return found


def _literal(node: ast.expr) -> str | None:
    """The text of a literal pattern; for an f-string, its literal parts with ``{}`` for the rest."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        return node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(part.value) if isinstance(part, ast.Constant) else "{}" for part in node.values)
    if isinstance(node, ast.BinOp):  # implicit concatenation is folded by the parser; "a" + "b" is not
        left, right = _literal(node.left), _literal(node.right)
        return None if left is None or right is None else left + right
    return None


def test_the_audit_sees_the_validators() -> None:
    """The scan finds the package's patterns (so the next test cannot pass by finding none)."""
    files = {file for file, _, _ in _pattern_literals()}
    assert {"ids.py", "config/server.py", "core/validation.py", "core/mfa/step_up.py"} <= files


def test_no_pattern_of_the_package_ends_at_a_bare_dollar() -> None:
    """Anchors are ``\\Z`` (or the call is ``fullmatch``): a ``$`` accepts a trailing newline."""
    dollars = [f"{file}:{line} {text!r}" for file, line, text in _pattern_literals() if text.endswith("$")]
    assert dollars == []


NOW = datetime(2026, 1, 1, tzinfo=UTC)
VALID = [
    (ids.ULID_RE, ids.new_ulid(NOW)),
    (ids.DEVICE_ID, ids.new_device_id()),
    (ids.JTI, ids.new_jti()),
    (ids.CHALLENGE_ID, ids.new_challenge_id()),
    (ids.REFRESH_TOKEN, ids.new_refresh_token()),
    (ids.GRANT_TOKEN, ids.new_grant_token()),
    (ids.REQUEST_ID, "req-12345678"),
    (validation.ROLE_NAME, "admin"),
    (validation._LANGUAGE_TAG, "de-CH"),
    (validation._LOCAL_PART, "mallory"),
    (validation._LABEL, "example"),
    (step_up._ACTION, "export"),
    (access._B64URL, "eyJhbGciOiJFUzI1NiJ9"),
]


@pytest.mark.parametrize(("pattern", "value"), VALID, ids=[p.pattern[:24] for p, _ in VALID])
@pytest.mark.parametrize("tail", ["\n", "\r\n", "\nx"])
def test_a_valid_value_with_a_trailing_line_break_is_refused(
    pattern: re.Pattern[str], value: str, tail: str
) -> None:
    """The value matches; the same value followed by a line break does not."""
    assert pattern.match(value)
    assert pattern.match(value + tail) is None


def test_configuration_windows_allow_surrounding_blanks_only() -> None:
    """Limiter windows tolerate blanks around the value (a line break from a file included), but
    nothing after it."""
    assert groups._WINDOW.match("10/1m fc\n")
    assert groups._WINDOW.match("10/1m fc\nx") is None


@pytest.mark.parametrize(
    "address", ["mallory\n@example.com", "mallory@exam\nple.com", "mal\nlory@example.com"]
)
def test_an_address_with_a_line_break_inside_is_invalid(address: str) -> None:
    """Trimming takes the edges; a line break inside the address is a field violation."""
    violations = validation.Violations()
    assert validation.check_email(violations, "email", address) is None
    assert [item.field for item in violations.items] == ["email"]
