"""Email and name rules (behaviour.md 2.1) and device trust (1.7), without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from iam_grpc.core.devices import is_trusted, matches_baseline
from iam_grpc.core.validation import Violations, check_email, check_name
from iam_grpc.storage.records import UserDevice
from iam_grpc.ua import ParsedAgent

NOW = datetime(2026, 6, 1, tzinfo=UTC)
FIREFOX = ParsedAgent(
    browser_family="Firefox", browser_major="120", os_family="Ubuntu", device_type="desktop"
)


@pytest.mark.parametrize(
    ("raw", "display", "norm"),
    [
        ("  Jane.Doe@Example.COM ", "Jane.Doe@example.com", "jane.doe@example.com"),
        ("user@163.com", "user@163.com", "user@163.com"),
        ("a@example.online", "a@example.online", "a@example.online"),
        ("x+tag@bücher.de", "x+tag@bücher.de", "x+tag@xn--bcher-kva.de"),
        ("o'brien@example.ie", "o'brien@example.ie", "o'brien@example.ie"),
        ("ｊａｎｅ@example.com", "jane@example.com", "jane@example.com"),
    ],
)
def test_valid_addresses_keep_their_spelling_and_normalise_for_lookups(
    raw: str, display: str, norm: str
) -> None:
    """Stored as entered with the domain lowercased; email_norm fully lowercased with an ASCII domain."""
    address = check_email(Violations(), "email", raw)
    assert address is not None
    assert (address.display, address.norm) == (display, norm)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "plain",
        "a@@example.com",
        "a(b)@example.com",
        "a b@example.com",
        '"quoted"@example.com',
        ".a@example.com",
        "a..b@example.com",
        "x" * 65 + "@example.com",
        "a@localhost",
        "a@example.123",
        "a@-example.com",
        "a@example-.com",
        "a@" + "x" * 64 + ".com",
        "a@" + ("abcdefghij." * 25) + "com",
    ],
)
def test_invalid_addresses_are_one_field_violation(raw: str) -> None:
    """Each broken rule is reported on the field, and nothing is returned."""
    violations = Violations()
    assert check_email(violations, "email", raw) is None
    assert [v.field for v in violations.items] == ["email"]


@pytest.mark.parametrize(
    ("raw", "required", "ok"),
    [
        ("Ada", True, True),
        ("  Zoë  ", True, True),
        ("", True, False),
        ("", False, True),
        ("x" * 100, True, True),
        ("x" * 101, True, False),
        ("Ada\u200bLovelace", True, False),  # a format character (Cf)
        ("Ada\x07", True, False),  # a control character (Cc)
        ("<b>Ada</b>", True, True),  # never escaped on the way in, never refused for markup
    ],
)
def test_names(raw: str, required: bool, ok: bool) -> None:
    """NFKC, 1-100 code points (0-100 when optional), no Cc or Cf characters."""
    violations = Violations()
    check_name(violations, "name", raw, required=required)
    assert (not violations.items) is ok


def link(**changes: object) -> UserDevice:
    fields: dict[str, object] = {
        "user_id": "u",
        "device_id": "d",
        "first_seen_at": NOW - timedelta(days=10),
        "last_seen_at": NOW - timedelta(days=1),
        "trusted_at": NOW - timedelta(days=10),
        "baseline": {"browser_family": "Firefox", "os_family": "Ubuntu", "device_type": "desktop"},
    }
    fields.update(changes)
    return UserDevice(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "agent", "trusted"),
    [
        (link(), FIREFOX, True),
        (None, FIREFOX, False),
        (link(trusted_at=None), FIREFOX, False),
        (link(trust_revoked_at=NOW - timedelta(days=2)), FIREFOX, False),
        (link(trust_revoked_at=NOW - timedelta(days=20)), FIREFOX, True),  # trust granted again since
        (link(last_seen_at=NOW - timedelta(days=91)), FIREFOX, False),
        (link(), ParsedAgent(browser_family="Chrome", os_family="Ubuntu", device_type="desktop"), False),
        (link(), ParsedAgent(browser_family="firefox", os_family="UBUNTU", device_type="Desktop"), True),
        # a field left out is a difference, not a wildcard: an empty or stripped User-Agent
        (link(), ParsedAgent(browser_family="firefox", os_family="Ubuntu", device_type=None), False),
        (link(), ParsedAgent(browser_family=None, os_family="Ubuntu", device_type="desktop"), False),
        (link(), ParsedAgent(), False),
    ],
)
def test_device_trust(device: UserDevice | None, agent: ParsedAgent, trusted: bool) -> None:
    """Trusted: granted, not revoked since, seen within 90 days, same coarse fingerprint."""
    assert is_trusted(device, agent, NOW, timedelta(days=90)) is trusted


def test_a_field_recorded_in_the_baseline_must_be_present() -> None:
    """Every coarse field the baseline recorded must be present and equal (an empty or stripped
    User-Agent is no wildcard); a field the baseline never recorded is not compared."""
    assert matches_baseline({}, FIREFOX)
    assert matches_baseline({"os_family": "ubuntu"}, FIREFOX)
    assert not matches_baseline({"os_family": "Windows"}, FIREFOX)
    assert not matches_baseline(
        {"browser_family": "Firefox", "os_family": "Ubuntu", "device_type": "desktop"}, ParsedAgent()
    )
