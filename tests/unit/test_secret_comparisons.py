"""S48: secrets and their hashes are compared in constant time, and keyed hashes are separated per
use. A lint over the package's syntax trees flags every ``==``/``!=`` whose operand is named like a
secret (hash, code, token, key, digest, signature); each flagged comparison must be one reviewed
here as not comparing a secret, so a new one fails this test until it is rewritten with
``constant_time_equal`` or reviewed."""

from __future__ import annotations

import ast
import hashlib
import re
import secrets
from pathlib import Path

from iam_grpc.core.crypto import SecretMaterial, constant_time_equal
from iam_grpc.ids import b64url

PACKAGE = Path(__file__).parents[2] / "iam_grpc"
# The client distribution's package: its files are named iam_grpc_client/...
CLIENT_PACKAGE = Path(__file__).parents[2] / "clients" / "python" / "iam_grpc_client"
SECRET_NAME = re.compile(r"(hash|code|token|key|digest|signature)", re.IGNORECASE)

# Reviewed: none of these compares a secret or a hash of one.
REVIEWED = {
    "iam_grpc_client/_interceptor.py: key == 'authorization'",  # a metadata header name
    "core/common_passwords.py: self._digests[at] == digest",  # a digest of a public common password
    "core/fingerprint.py: entry.get('prefix') == key",  # a network prefix
    "core/fingerprint.py: known != code",  # an ISO country code
    "core/ratelimit/limiter.py: group.key != 'ip'",  # a limiter group's key kind
    "core/risk.py: group.key != 'ip'",
    "hibp.py: match.group(1).upper() != digest",  # the public SHA-1 range of a breach corpus line
    "hibp.py: event.status_code != 200",  # an HTTP status
    "interceptors/access_log.py: code == 'OK'",  # a gRPC status name
    "interceptors/access_log.py: call.code != 'OK'",
    "interceptors/callers.py: key == API_KEY_HEADER",  # a metadata header name (the key itself is hashed and compared in constant time)
    "interceptors/context.py: item_key == key",  # a metadata header name
    "logging.py: key == 'kind'",  # a log field name
    "process.py: code == EXIT_REFUSED",  # a process exit status
    "process.py: code == 0",
    "iam_grpc_client/_status.py: key == 'grpc-status-details-bin'",  # a trailer name
}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return None


def _is_sql(node: ast.expr) -> bool:
    """SQLAlchemy column expressions (``table.c.x == bindparam(...)``) build SQL, not comparisons."""
    text = ast.unparse(node)
    return ".c." in text or text.startswith("bindparam(")


def flagged_comparisons() -> set[str]:
    found = set()
    paths = {path: path.relative_to(PACKAGE) for path in PACKAGE.rglob("*.py")}
    paths |= {path: path.relative_to(CLIENT_PACKAGE.parent) for path in CLIENT_PACKAGE.rglob("*.py")}
    for path, shown in sorted(paths.items()):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                continue
            operands = [node.left, *node.comparators]
            if any(_is_sql(operand) for operand in operands):
                continue
            if any((name := _name(operand)) and SECRET_NAME.search(name) for operand in operands):
                found.add(f"{shown}: {ast.unparse(node)}")
    return found


def test_no_secret_is_compared_with_equality() -> None:
    """Every ==/!= on a secret-sounding operand is a reviewed non-secret comparison."""
    assert flagged_comparisons() - REVIEWED == set()


def test_the_review_list_has_no_stale_entries() -> None:
    """Reviewed comparisons that no longer exist are removed, so the list stays meaningful."""
    assert REVIEWED - flagged_comparisons() == set()


def test_the_comparison_helper() -> None:
    """constant_time_equal: equal values, different values, different lengths, str and bytes."""
    assert constant_time_equal("abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal("abc", "abcd")
    assert constant_time_equal(b"\x00\x01", b"\x00\x01")


def test_keyed_hashes_are_separated_per_use() -> None:
    """One input hashed for five uses gives five values, none equal to an unkeyed SHA-256."""
    material = SecretMaterial(secrets.token_bytes(32))
    value = "the same input"
    hashed = {material.keyed_hash(use, value) for use in ("refresh", "otp", "grant", "ratelimit", "log")}
    digest = hashlib.sha256(value.encode()).digest()
    plain = {digest.hex(), b64url(digest)}
    assert len(hashed) == 5
    assert hashed.isdisjoint(plain)
