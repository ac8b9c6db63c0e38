"""iam_grpc.testing's helpers as a user of the package calls them: the audit events a block
committed, and the codes the outbox holds for a recipient, opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from iam_grpc.proto import auth_pb2, auth_pb2_grpc
from iam_grpc.testing import CHEAPEST_ARGON2, capture_audit, capture_outbox, running_service
from tests.accounts_helper import PASSWORD, client, new_email, signup
from tests.conftest import Backend
from tests.sessions_helper import IPHONE


async def test_capture_audit_and_outbox_show_what_a_login_from_a_new_device_did(
    tmp_path: Path, backend: Backend
) -> None:
    email = new_email()
    async with running_service(tmp_path, backend.isolated()) as iam, iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        await signup(auth, email, context=client(ip="198.51.100.1"))
        with capture_audit(iam) as events, capture_outbox(iam) as mails:
            answer = await auth.Login(
                auth_pb2.LoginRequest(
                    client=client(ip="198.51.100.7", ua=IPHONE), email=email, password=PASSWORD
                )
            )
        assert answer.WhichOneof("result") == "mfa"
        assert [event.type for event in events if event.user_id] != []
        assert all(event.occurred_at is not None for event in events)
        # the listener is gone once the block ends: a sign-up afterwards adds nothing
        seen = len(events)
        await signup(auth, context=client(ip="198.51.100.2"))
        assert len(events) == seen
        with capture_audit(iam) as later:
            await signup(auth, context=client(ip="198.51.100.3"))
        assert later != []

        codes = [mail for mail in mails if mail.kind == "mfa_code" and mail.to == email]
        assert len(codes) == 1, [mail.kind for mail in mails]
        assert codes[0].params["code"].isdigit()
        assert codes[0].params["link"].startswith("http")
        # the code from the capture completes the challenge, as the user's would
        from iam_grpc.proto import mfa_pb2, mfa_pb2_grpc

        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        verified = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=client(ip="198.51.100.7", ua=IPHONE),
                challenge_id=answer.mfa.challenge_id,
                code=codes[0].params["code"],
            )
        )
        assert verified.session.access_token


def test_the_cheapest_profile_is_argon2_cffis() -> None:
    from argon2.profiles import CHEAPEST

    assert CHEAPEST_ARGON2 is CHEAPEST
    assert CHEAPEST_ARGON2.memory_cost < 19456


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
