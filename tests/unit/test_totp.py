"""TOTP codes, the window, the sealed secret and recovery-code shapes (core/mfa/totp.py)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import cast

import pyotp
import pytest

from iam_grpc.clock import ManualClock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.mfa.totp import TotpFactors, TotpPolicy, normalize_recovery_code
from iam_grpc.storage.ports import Database

START = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def factors(window: int = 1, key: bytes | None = None) -> tuple[TotpFactors, ManualClock]:
    clock = ManualClock(START)
    material = SecretMaterial(key or secrets.token_bytes(32))
    return TotpFactors(cast(Database, None), material, clock, TotpPolicy(window=window)), clock


def test_a_code_of_the_window_names_its_time_step() -> None:
    """Codes of now and one step either side match, with the step they belong to; two away do not."""
    totp, clock = factors()
    secret = totp.new_secret()
    app = pyotp.TOTP(secret)
    now = int(clock.now().timestamp())
    step = now // 30
    for offset in (-1, 0, 1):
        assert totp.step_of(secret, app.at(now + 30 * offset)) == step + offset
    for offset in (-2, 2):
        assert totp.step_of(secret, app.at(now + 30 * offset)) is None


def test_window_zero_accepts_only_the_current_step() -> None:
    """totp_window = 0: the previous step's code is refused."""
    totp, clock = factors(window=0)
    secret = totp.new_secret()
    now = int(clock.now().timestamp())
    assert totp.step_of(secret, pyotp.TOTP(secret).at(now)) == now // 30
    assert totp.step_of(secret, pyotp.TOTP(secret).at(now - 30)) is None


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12345a", "１２３４５６", " 12345", "123456\n"])
def test_codes_of_the_wrong_shape_never_match(code: str) -> None:
    """Only six ASCII digits are compared."""
    totp, _ = factors()
    assert totp.step_of(totp.new_secret(), code) is None


def test_the_secret_is_sealed_to_its_user() -> None:
    """The sealed form holds neither the base32 text nor the key bytes; it opens for its user
    only, and not under another master key."""
    key = secrets.token_bytes(32)
    totp, _ = factors(key=key)
    secret = totp.new_secret()
    sealed = totp.seal("01JUSER0000000000000000000", secret)
    assert secret.encode() not in sealed
    assert pyotp.TOTP(secret).byte_secret() not in sealed
    assert totp.open("01JUSER0000000000000000000", sealed) == secret
    assert totp.open("01JOTHER000000000000000000", sealed) is None
    other, _ = factors()
    assert other.open("01JUSER0000000000000000000", sealed) is None


def test_recovery_codes_are_ten_distinct_codes_hashed_with_a_key() -> None:
    """Ten codes of the documented shape; the stored hashes reveal no code and differ per user."""
    totp, _ = factors()
    codes, hashes = totp.new_recovery_codes("01JUSER0000000000000000000")
    assert len(set(codes)) == 10
    assert all(normalize_recovery_code(code) is not None for code in codes)
    assert all(code.replace("-", "") not in digest for code in codes for digest in hashes)
    _, others = totp.new_recovery_codes("01JOTHER000000000000000000")
    assert not set(hashes) & set(others)


@pytest.mark.parametrize(
    ("typed", "normal"),
    [
        ("abcd-efgh-jkmn", "abcdefghjkmn"),
        ("ABCD EFGH JKMN", "abcdefghjkmn"),
        ("abcdefghjkmn", "abcdefghjkmn"),
        ("abcd-efgh-jkm0", None),  # 0 is not in the alphabet (nor o, 1, i, l)
        ("abcd-efgh-jkm", None),
        ("abcd-efgh-jkmnp", None),
        ("abcd-efgh-jkm\n", None),
        ("ａｂｃｄ-ｅｆｇｈ-ｊｋｍｎ", None),
        ("", None),
    ],
)
def test_recovery_codes_are_read_forgivingly_but_strictly(typed: str, normal: str | None) -> None:
    """Case, hyphens and spaces do not matter; anything outside the alphabet or the length does."""
    assert normalize_recovery_code(typed) == normal


def test_the_window_follows_the_injected_clock() -> None:
    """Moving the clock by a step moves which codes match."""
    totp, clock = factors(window=0)
    secret = totp.new_secret()
    code = pyotp.TOTP(secret).at(int(clock.now().timestamp()))
    clock.advance(timedelta(seconds=30))
    assert totp.step_of(secret, code) is None
