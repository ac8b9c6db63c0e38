"""The shape of personal API-token secrets: a fixed prefix, random base62 and a checksum that
catches a mistyped or truncated secret before any lookup."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from iam_grpc.core.api_tokens import PREFIX, display_prefix, new_secret, well_formed


def test_a_new_secret_has_the_prefix_and_passes_its_checksum() -> None:
    """iam_pat_ + 32 random + 6 checksum characters, all base62."""
    secret = new_secret()
    assert secret.startswith(PREFIX)
    assert len(secret) == 46
    assert set(secret[len(PREFIX) :]) <= set(string.ascii_letters + string.digits)
    assert well_formed(secret)


def test_secrets_do_not_repeat() -> None:
    """About 190 random bits: a thousand draws never collide."""
    assert len({new_secret() for _ in range(1000)}) == 1000


@given(
    st.integers(min_value=len(PREFIX), max_value=45), st.sampled_from(string.ascii_letters + string.digits)
)
def test_any_single_character_change_is_caught(position: int, replacement: str) -> None:
    """Changing one character after the prefix fails the checksum (CRC-32 catches every single
    substitution)."""
    secret = new_secret()
    if secret[position] == replacement:
        return
    typo = secret[:position] + replacement + secret[position + 1 :]
    assert not well_formed(typo)


def test_truncated_extended_and_foreign_shapes_are_refused() -> None:
    """Wrong length, another prefix, characters outside base62, whitespace: all refused."""
    secret = new_secret()
    for bad in (
        secret[:-1],
        secret + "A",
        "ghp_" + secret[len(PREFIX) :],
        secret[:20] + "-" + secret[21:],
        secret + "\n",
        " " + secret,
        "",
        PREFIX,
        secret.upper(),
    ):
        assert not well_formed(bad), bad


def test_the_display_prefix_is_the_fixed_prefix_and_four_characters() -> None:
    secret = new_secret()
    assert display_prefix(secret) == secret[:12]
