"""Magic-link tokens (behaviour.md 5.2, 5.3): what verifies, what does not, and single use."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from iam_grpc.clock import ManualClock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.links import Links
from iam_grpc.errors import ChallengeExpired, InvalidArgument, LinkUsed
from iam_grpc.storage.memory import MemoryEphemeral

PATHS = {
    "mfa": "/auth/mfa",
    "step_up": "/auth/step-up",
    "password_reset": "/auth/reset-password",
    "email_change": "/auth/confirm-email",
}
KEY = secrets.token_bytes(32)


def links(clock: ManualClock, material: SecretMaterial | None = None) -> Links:
    return Links(
        material or SecretMaterial(KEY),
        MemoryEphemeral(clock=clock),
        clock,
        issuer="iam-grpc",
        base_url="https://app.example/",
        paths=PATHS,
    )


async def test_an_issued_link_verifies_for_its_purpose_and_carries_its_claims() -> None:
    """The URL is base + path + ?token=; verification returns subject, expiry and claims."""
    clock = ManualClock(datetime(2026, 5, 1, tzinfo=UTC))
    signer = links(clock)
    issued = signer.issue("password_reset", "user-1", timedelta(minutes=20), cv=3)
    assert issued.url.startswith("https://app.example/auth/reset-password?token=")
    claims = await signer.verify(issued.token, "password_reset")
    assert (claims.subject, claims.extra["cv"], claims.jti) == ("user-1", 3, issued.jti)
    assert claims.expires_at == clock.now() + timedelta(minutes=20)


@pytest.mark.parametrize("ahead", [timedelta(seconds=2), timedelta(days=3)])
async def test_links_follow_the_injected_clock_not_the_machines(ahead: timedelta) -> None:
    """A link minted by a clock ahead of the machine's (another replica's, or a test's) verifies:
    its issue time is no reason to refuse it, only its expiry on the service's clock is."""
    clock = ManualClock(datetime.now(UTC) + ahead)
    signer = links(clock)
    issued = signer.issue("mfa", "user-1", timedelta(minutes=10), cid="ch_x")
    assert (await signer.verify(issued.token, "mfa")).jti == issued.jti


async def test_another_purpose_is_refused_as_invalid_and_not_consumed() -> None:
    """A reset link at ConfirmEmailChange is INVALID_ARGUMENT on link_token; it still works for a reset."""
    clock = ManualClock()
    signer = links(clock)
    issued = signer.issue("password_reset", "user-1", timedelta(minutes=20), cv=1)
    with pytest.raises(InvalidArgument) as caught:
        await signer.verify(issued.token, "email_change")
    assert [v.field for v in caught.value.violations] == ["link_token"]
    await signer.verify(issued.token, "password_reset")


async def test_expired_links_are_challenge_expired_and_used_ones_link_used() -> None:
    """Past exp: CHALLENGE_EXPIRED; after mark_used: LINK_USED, and a second mark reports False."""
    clock = ManualClock()
    signer = links(clock)
    issued = signer.issue("password_reset", "user-1", timedelta(minutes=20), cv=1)
    claims = await signer.verify(issued.token, "password_reset")
    assert await signer.mark_used(claims)
    assert not await signer.mark_used(claims)
    with pytest.raises(LinkUsed):
        await signer.verify(issued.token, "password_reset")
    later = signer.issue("password_reset", "user-1", timedelta(minutes=20), cv=1)
    clock.advance(timedelta(minutes=21))
    with pytest.raises(ChallengeExpired):
        await signer.verify(later.token, "password_reset")


@pytest.mark.parametrize(
    "forge",
    [
        lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"),  # signature
        lambda t: jwt.encode(
            jwt.decode(t, options={"verify_signature": False}),
            "x" * 32,
            algorithm="HS256",
            headers={"typ": "iam-link+jwt", "kid": jwt.get_unverified_header(t)["kid"]},
        ),
        lambda t: jwt.encode(
            jwt.decode(t, options={"verify_signature": False}),
            None,
            algorithm="none",
            headers={"typ": "iam-link+jwt", "kid": jwt.get_unverified_header(t)["kid"]},
        ),
        lambda t: "not.a.token",
        lambda t: "x" * 2049,
    ],
)
async def test_forged_and_malformed_links_are_invalid(forge: object) -> None:
    """A changed signature, another key, alg none, garbage, oversize: INVALID_ARGUMENT."""
    clock = ManualClock()
    signer = links(clock)
    issued = signer.issue("password_reset", "user-1", timedelta(minutes=20), cv=1)
    with pytest.raises(InvalidArgument):
        await signer.verify(forge(issued.token), "password_reset")  # type: ignore[operator]


async def test_links_signed_under_a_previous_master_key_still_verify() -> None:
    """After a master-key rotation (old key listed as previous) earlier links keep working."""
    clock = ManualClock()
    old = links(clock)
    issued = old.issue("password_reset", "user-1", timedelta(minutes=20), cv=1)
    rotated = links(clock, SecretMaterial(secrets.token_bytes(32), [KEY]))
    assert (await rotated.verify(issued.token, "password_reset")).subject == "user-1"
    stranger = links(clock, SecretMaterial(secrets.token_bytes(32)))
    with pytest.raises(InvalidArgument):
        await stranger.verify(issued.token, "password_reset")


def test_a_link_without_its_purpose_claims_cannot_be_issued() -> None:
    """An email-change link needs cv, sid, nem and oeh."""
    with pytest.raises(ValueError, match="needs"):
        links(ManualClock()).issue("email_change", "user-1", timedelta(hours=1), cv=1)
