"""Identifier formats (behaviour.md section 0)."""

from __future__ import annotations

from datetime import UTC, datetime

from ulid import ULID

from iam_grpc import ids


def test_identifiers_have_their_documented_shapes() -> None:
    """Each generator matches its pattern and carries the documented randomness."""
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert ids.ULID_RE.match(ids.new_ulid(now))
    assert ids.DEVICE_ID.match(ids.new_device_id())
    assert ids.JTI.match(ids.new_jti())
    assert ids.CHALLENGE_ID.match(ids.new_challenge_id())
    assert ids.REFRESH_TOKEN.match(ids.new_refresh_token())
    assert ids.GRANT_TOKEN.match(ids.new_grant_token())
    assert len(ids.new_device_id()) == 26


def test_ulids_carry_the_injected_clock_time() -> None:
    """The time part of a ULID is the clock's, not the machine's."""
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert ULID.from_str(ids.new_ulid(now)).datetime == now


def test_generated_values_do_not_repeat() -> None:
    """10,000 refresh tokens are all distinct."""
    assert len({ids.new_refresh_token() for _ in range(10_000)}) == 10_000
