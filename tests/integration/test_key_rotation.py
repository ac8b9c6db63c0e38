"""Signing-key rotation (behaviour.md 1.3, S26, S27): published before it signs,
old tokens verify through the overlap and no longer, emergency revocation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import jwt

from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import error_details, running_service
from tests.conftest import Backend
from tests.sessions_helper import new_session

SHORT = {
    "IAM_KEYS__PUBLISH_AHEAD": "2s",
    "IAM_KEYS__JWKS_MAX_AGE": "1s",
    "IAM_TOKENS__ACCESS_TTL": "2s",
    "IAM_TOKENS__LEEWAY": "0s",
    "IAM_KEYS__ROTATION_INTERVAL": "0",
}


async def reason(stub: token_pb2_grpc.TokenServiceStub, token: str) -> str:
    try:
        await stub.VerifyAccessToken(token_pb2.VerifyAccessTokenRequest(access_token=token))
    except grpc.aio.AioRpcError as error:
        return error_details(error).reason or ""
    return "OK"


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_planned_rotation_publishes_first_and_retires_after_the_overlap(
    own_database: Backend, tmp_path: Path
) -> None:
    """The JWKS lists the new key before any token carries it; old-key tokens verify until unpublished, then fail."""
    async with running_service(tmp_path, {**own_database.environ, **SHORT}) as iam, iam.channel() as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        old = iam.app.components.keys.signing_key()
        assert old is not None
        _, before = await new_session(iam.app)
        now = int(time.time())
        long_lived = jwt.encode(
            {**jwt.decode(before.access_token, options={"verify_signature": False}), "exp": now + 3600},
            old.private,
            algorithm="ES256",
            headers={"kid": old.row.kid, "typ": "at+jwt"},
        )
        new = await iam.app.components.keys.rotate()
        published = {
            k["kid"] for k in json.loads((await stub.GetJwks(token_pb2.GetJwksRequest())).jwks_json)["keys"]
        }
        assert published == {old.row.kid, new.kid}
        _, during = await new_session(iam.app)
        assert kid(during.access_token) == old.row.kid  # the new key does not sign yet
        await asyncio.sleep(2.1)
        _, after = await new_session(iam.app)
        assert kid(after.access_token) == new.kid
        assert await reason(stub, long_lived) == "OK"  # the old key still verifies through the overlap
        await iam.app.components.keys.maintain()
        assert iam.app.components.keys.signing_key() is not None
        assert [
            r.private_key_enc is None for r in iam.app.components.keys.rows() if r.kid == old.row.kid
        ] == [True]
        await asyncio.sleep(3.1)  # deactivate + access TTL + leeway + JWKS max-age
        assert await reason(stub, long_lived) == "TOKEN_INVALID"
        published = {
            k["kid"] for k in json.loads((await stub.GetJwks(token_pb2.GetJwksRequest())).jwks_json)["keys"]
        }
        assert published == {new.kid}


async def test_emergency_rotation_withdraws_a_key_at_once(own_database: Backend, tmp_path: Path) -> None:
    """--immediate --revoke: tokens of the revoked key fail immediately; new tokens use the new key."""
    async with running_service(tmp_path, own_database.environ) as iam, iam.channel() as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        _, compromised = await new_session(iam.app)
        revoked = kid(compromised.access_token)
        new = await iam.app.components.keys.rotate(immediate=True, revoke=revoked)
        assert await reason(stub, compromised.access_token) == "TOKEN_INVALID"
        _, fresh = await new_session(iam.app)
        assert kid(fresh.access_token) == new.kid
        assert await reason(stub, fresh.access_token) == "OK"
        published = {
            k["kid"] for k in json.loads((await stub.GetJwks(token_pb2.GetJwksRequest())).jwks_json)["keys"]
        }
        assert revoked not in published


async def test_a_replica_learns_a_new_key_from_an_unknown_kid(
    shared_own_database: Backend, tmp_path: Path
) -> None:
    """A token signed by a key another replica just created verifies after one reload."""
    environ = shared_own_database.environ
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        await a.app.components.keys.rotate(immediate=True)
        _, session = await new_session(a.app)
        async with b.channel() as on_b:
            assert await reason(token_pb2_grpc.TokenServiceStub(on_b), session.access_token) == "OK"


async def test_rotating_keys_of_the_other_algorithm(own_database: Backend, tmp_path: Path) -> None:
    """With tokens.algorithm = EdDSA, new keys are Ed25519 and tokens say alg EdDSA."""
    async with (
        running_service(tmp_path, {**own_database.environ, "IAM_TOKENS__ALGORITHM": "EdDSA"}) as iam,
        iam.channel() as channel,
    ):
        await iam.app.components.keys.rotate(immediate=True)
        _, session = await new_session(iam.app)
        assert jwt.get_unverified_header(session.access_token)["alg"] == "EdDSA"
        assert await reason(token_pb2_grpc.TokenServiceStub(channel), session.access_token) == "OK"
