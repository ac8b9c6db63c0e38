"""The token system through the real server on both backends (behaviour.md 1.2-1.6;
security.md S19-S36)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import text

from iam_grpc.app import Application
from iam_grpc.core.tokens.denylist import sid_key
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.sessions_helper import FIREFOX, IPHONE, NO_ANOMALY_CHECKS, new_session, new_user

FAST = {"IAM_REFRESH_GRACE_SECONDS": "1", "IAM_TEST_FAILPOINTS": "1", **NO_ANOMALY_CHECKS}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("tokens"), {**backend.isolated(), **FAST}) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[token_pb2_grpc.TokenServiceStub]:
    async with iam.channel() as channel:
        yield token_pb2_grpc.TokenServiceStub(channel)


def client(ip: str = "", ua: str = FIREFOX, device_id: str = "") -> common_pb2.ClientContext:
    """A client context; each call a fresh IP, so the per-IP limits of one test never meet another's."""
    ip = ip or f"198.51.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"
    return common_pb2.ClientContext(ip=ip, user_agent=ua, device_id=device_id)


async def verify_error(
    stub: token_pb2_grpc.TokenServiceStub, token: str, roles: tuple[str, ...] = ()
) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=token, required_roles=roles)
        )
    details = error_details(caught.value)
    return details.code, details.reason


async def refresh_error(
    stub: token_pb2_grpc.TokenServiceStub, token: str, device_id: str = ""
) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Refresh(token_pb2.RefreshRequest(client=client(device_id=device_id), refresh_token=token))
    details = error_details(caught.value)
    return details.code, details.reason, details.metadata


def signing_key(app: Application) -> Any:
    key = app.components.keys.signing_key()
    assert key is not None
    return key


def claims_for(app: Application, session: Any, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "iam-grpc",
        "aud": "iam-grpc",
        "sub": session.user_id,
        "sid": session.session_id,
        "did": session.device_id,
        "roles": ["user"],
        "jti": "a" * 22,
        "iat": now,
        "exp": now + 600,
        "auth_time": now,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def forge(
    app: Application,
    claims: dict[str, Any],
    *,
    headers: dict[str, Any] | None = None,
    key: Any = None,
    alg: str = "ES256",
) -> str:
    """A token signed with the service's real key (or another), with chosen header and claims."""
    signer = signing_key(app)
    base = {"kid": signer.row.kid, "typ": "at+jwt"}
    base.update(headers or {})
    header = {k: v for k, v in base.items() if v is not None}
    return jwt.encode(claims, key if key is not None else signer.private, algorithm=alg, headers=header)


# access tokens -----------------------------------------------------------------------------


async def test_a_session_access_token_verifies_with_its_claims(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """VerifyAccessToken answers the token's user, session, device, sorted roles, expiry and jti."""
    user, session = await new_session(iam.app, await new_user(iam.app, roles=("admin", "billing")))
    answer = await stub.VerifyAccessToken(
        token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
    )
    assert (answer.user_id, answer.session_id, answer.device_id) == (
        user.id,
        session.session_id,
        session.device_id,
    )
    assert list(answer.roles) == ["admin", "billing", "user"]
    assert answer.expires_at.ToDatetime().replace(tzinfo=None) == session.access_expires_at.replace(
        tzinfo=None
    )
    header = jwt.get_unverified_header(session.access_token)
    assert (header["alg"], header["typ"], header["kid"]) == ("ES256", "at+jwt", signing_key(iam.app).row.kid)
    assert set(header) == {"alg", "typ", "kid"}


async def test_required_roles_are_enforced(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A missing role is PERMISSION_DENIED ROLE_REQUIRED naming it; malformed role names are INVALID_ARGUMENT."""
    _, session = await new_session(iam.app)
    ok = await stub.VerifyAccessToken(
        token_pb2.VerifyAccessTokenRequest(access_token=session.access_token, required_roles=["user"])
    )
    assert ok.roles == ["user"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(
                access_token=session.access_token, required_roles=["user", "admin", "auditor"]
            )
        )
    details = error_details(caught.value)
    assert (details.code, details.reason, details.metadata) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_REQUIRED",
        {"missing": "admin,auditor"},
    )
    assert (await verify_error(stub, session.access_token, ("Not A Role",)))[1] == "INVALID_ARGUMENT"


async def test_only_the_configured_algorithm_verifies(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """alg none, HS256 keyed with the public key, RS256 and EdDSA all fail as TOKEN_INVALID (S19)."""
    _, session = await new_session(iam.app)
    claims = claims_for(iam.app, session)
    public_pem = signing_key(iam.app).public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = signing_key(iam.app).row.kid
    none = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "at+jwt", "kid": kid}).encode())
        .rstrip(b"=")
        .decode()
    )
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    header = (
        base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
        .rstrip(b"=")
        .decode()
    )
    import hashlib
    import hmac

    mac = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    hs256 = f"{header}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    tokens = [
        f"{none}.{body}.",
        hs256,
        forge(
            iam.app, claims, key=rsa.generate_private_key(public_exponent=65537, key_size=2048), alg="RS256"
        ),
        forge(iam.app, claims, key=ed25519.Ed25519PrivateKey.generate(), alg="EdDSA"),
    ]
    for token in tokens:
        assert await verify_error(stub, token) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


@pytest.mark.parametrize(
    "header",
    [
        {"jku": "https://evil/jwks"},
        {"x5u": "https://evil/x5"},
        {"jwk": {"kty": "EC"}},
        {"x5c": ["MII"]},
        {"crit": ["exp"]},
        {"kid": None},
        {"typ": "JWT"},
    ],
)
async def test_untrusted_header_parameters_are_refused(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub, header: dict[str, Any]
) -> None:
    """jku, x5u, jwk, x5c, crit, a missing kid or another typ make a validly signed token TOKEN_INVALID (S20)."""
    _, session = await new_session(iam.app)
    token = forge(iam.app, claims_for(iam.app, session), headers=header)
    assert await verify_error(stub, token) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_unknown_kids_fail_cheaply(iam: RunningService, stub: token_pb2_grpc.TokenServiceStub) -> None:
    """100 tokens with unknown kids cause at most one key-table reload (S21)."""
    _, session = await new_session(iam.app)
    counter = iam.app.metrics.key_reloads
    before = counter._value.get()
    tokens = [
        forge(iam.app, claims_for(iam.app, session), headers={"kid": secrets.token_urlsafe(8)})
        for _ in range(100)
    ]
    results = await asyncio.gather(*(verify_error(stub, t) for t in tokens))
    assert set(results) == {(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")}
    assert counter._value.get() - before <= 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "someone-else"}, "TOKEN_INVALID"),
        ({"aud": "another-audience"}, "TOKEN_INVALID"),
        ({"sub": None}, "TOKEN_INVALID"),
        ({"sid": None}, "TOKEN_INVALID"),
        ({"did": None}, "TOKEN_INVALID"),
        ({"jti": None}, "TOKEN_INVALID"),
        ({"exp": None}, "TOKEN_INVALID"),
        ({"roles": "admin"}, "TOKEN_INVALID"),
        ({"iat": int(time.time()) + 3600}, "TOKEN_INVALID"),
        ({"exp": int(time.time()) - 120}, "TOKEN_EXPIRED"),
    ],
)
async def test_claims_are_checked_strictly(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub, changes: dict[str, Any], reason: str
) -> None:
    """Wrong or missing claims are TOKEN_INVALID; an expiry past the leeway is TOKEN_EXPIRED (S22)."""
    _, session = await new_session(iam.app)
    token = forge(iam.app, claims_for(iam.app, session, **changes))
    assert await verify_error(stub, token) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_expiry_within_the_leeway_still_verifies_and_forgeries_never_learn_expiry(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """exp 10 s ago (leeway 30 s) passes; an expired token with a bad signature is TOKEN_INVALID, not TOKEN_EXPIRED (S22)."""
    _, session = await new_session(iam.app)
    fresh = forge(iam.app, claims_for(iam.app, session, exp=int(time.time()) - 10))
    assert (
        await stub.VerifyAccessToken(token_pb2.VerifyAccessTokenRequest(access_token=fresh))
    ).session_id == session.session_id
    expired = forge(iam.app, claims_for(iam.app, session, exp=int(time.time()) - 3600))
    tampered = expired[:-6] + ("AAAAAA" if not expired.endswith("AAAAAA") else "BBBBBB")
    assert await verify_error(stub, tampered) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_tampered_foreign_and_other_kinds_of_tokens_are_refused(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A changed payload, a foreign signing key, a link token, a refresh token and a grant are TOKEN_INVALID (S23)."""
    _, session = await new_session(iam.app)
    head, body, sig = session.access_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = ["admin"]
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    link = jwt.encode(
        {"pur": "password_reset", "jti": "b" * 22},
        "k" * 32,
        algorithm="HS256",
        headers={"typ": "iam-link+jwt"},
    )
    for token in (
        f"{head}.{forged_body}.{sig}",
        forge(iam.app, claims_for(iam.app, session), key=ec.generate_private_key(ec.SECP256R1())),
        link,
        session.refresh_token,
        "iamg_" + "g" * 43,
        "",
        "x" * 5000,
    ):
        assert await verify_error(stub, token) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_the_jwks_lists_public_keys_only(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """GetJwks and /.well-known/jwks.json publish kid, alg, use and the public point; never d."""
    answer = await stub.GetJwks(token_pb2.GetJwksRequest())
    document = json.loads(answer.jwks_json)
    assert document["keys"]
    for key in document["keys"]:
        assert {"kid", "alg", "use", "kty", "crv", "x", "y"} <= set(key)
        assert "d" not in key
    reader, writer = await asyncio.open_connection("127.0.0.1", iam.http_port)
    writer.write(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"cache-control: public, max-age=300" in head.lower()
    assert json.loads(body) == document


# refresh ----------------------------------------------------------------------------------


async def test_refresh_rotates_and_keeps_the_session(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A refresh answers new tokens for the same session and device; the new access token verifies."""
    _, session = await new_session(iam.app)
    answer = await stub.Refresh(
        token_pb2.RefreshRequest(
            client=client(device_id=session.device_id), refresh_token=session.refresh_token
        )
    )
    rotated = answer.session
    assert rotated.session_id == session.session_id
    assert rotated.device_id == session.device_id
    assert rotated.refresh_token != session.refresh_token
    assert rotated.access_token != session.access_token
    verified = await stub.VerifyAccessToken(
        token_pb2.VerifyAccessTokenRequest(access_token=rotated.access_token)
    )
    assert verified.session_id == session.session_id


async def test_the_grace_cache_holds_no_usable_token_in_clear(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """The sealed rf:res value contains neither successor token, in any encoding we could spot (S32)."""
    _, session = await new_session(iam.app)
    rotated = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    sealed = await iam.app.components.ephemeral.get(
        f"rf:res:{{{iam.app.components.tokens.token_hash(session.refresh_token)}}}"
    )
    assert sealed is not None
    assert len(sealed) > 100
    for secret in (rotated.refresh_token, rotated.access_token, rotated.refresh_token[5:]):
        for form in (secret.encode(), base64.b64encode(secret.encode()), secret.encode().hex().encode()):
            assert form not in sealed
        assert secret.split(".")[-1].encode() not in sealed  # not even the JWT signature


async def test_concurrent_refreshes_in_the_grace_window_converge(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """10 parallel refreshes of one token all succeed with one successor pair; exactly one row is added (S31)."""
    _, session = await new_session(iam.app)
    request = token_pb2.RefreshRequest(
        client=client(device_id=session.device_id), refresh_token=session.refresh_token
    )
    answers = await asyncio.gather(*(stub.Refresh(request) for _ in range(10)))
    assert len({a.session.refresh_token for a in answers}) == 1
    assert len({a.session.access_token for a in answers}) == 1
    async with iam.app.components.db.transaction() as tx:
        chain = await tx.sessions.tokens_of(session.session_id)
        live = await tx.sessions.get(session.session_id)
    assert [t.generation for t in chain] == [0, 1]
    assert live is not None
    assert live.revoked_at is None


async def test_a_replay_after_the_grace_window_ends_the_session(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """Old token after grace: REFRESH_TOKEN_REUSED; the successor and every access token: SESSION_REVOKED;
    device distrusted, MFA hold set, alert mail queued, audited (S29, S30)."""
    user, session = await new_session(iam.app)
    first = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    await asyncio.sleep(1.3)  # grace is 1 s here
    assert (await refresh_error(stub, session.refresh_token))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "REFRESH_TOKEN_REUSED",
    )
    assert (await refresh_error(stub, first.refresh_token))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )
    for token in (session.access_token, first.access_token):
        assert await verify_error(stub, token) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    await iam.app.components.audit.drain()
    async with iam.app.components.db.transaction() as tx:
        link = await tx.devices.get_link(user.id, session.device_id)
        stored = await tx.users.get(user.id)
        events = [e.type for e in await tx.audit.recent(user_id=user.id)]
        mails = [m for m in await tx.outbox.list(limit=1000) if m.user_id == user.id]
        chain = await tx.sessions.tokens_of(session.session_id)
    assert link is not None
    assert link.trust_revoked_at is not None
    assert stored is not None
    assert stored.mfa_hold_until is not None
    assert "refresh.reuse_detected" in events
    assert [m.kind for m in mails] == ["security_alert"]
    assert {t.state for t in chain} == {"revoked"}


async def test_a_rotated_token_within_grace_without_its_result_is_refused_harmlessly(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """If the store lost the sealed result, a grace-window replay is TOKEN_INVALID and nothing is revoked."""
    _, session = await new_session(iam.app)
    first = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    await iam.app.components.ephemeral.delete(
        f"rf:res:{{{iam.app.components.tokens.token_hash(session.refresh_token)}}}"
    )
    assert (await refresh_error(stub, session.refresh_token))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
    )
    again = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=first.refresh_token))
    ).session
    assert again.session_id == session.session_id


async def test_stored_hashes_are_never_accepted_as_tokens(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """Only a keyed hash is stored; presenting it (raw, hex, or with the prefix) is TOKEN_INVALID (S28)."""
    _, session = await new_session(iam.app)
    async with iam.app.components.db.transaction() as tx:
        (row,) = await tx.sessions.tokens_of(session.session_id)
    assert session.refresh_token not in row.token_hash
    assert session.refresh_token[5:] not in row.token_hash
    import hashlib

    assert (
        row.token_hash
        != base64.urlsafe_b64encode(hashlib.sha256(session.refresh_token.encode()).digest())
        .rstrip(b"=")
        .decode()
    )
    raw_hash = base64.urlsafe_b64decode(row.token_hash + "=")
    for presented in (
        row.token_hash,
        "iamr_" + row.token_hash,
        raw_hash.hex(),
        "iamr_" + secrets.token_urlsafe(32),
    ):
        assert (await refresh_error(stub, presented))[:2] == (
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )


async def test_roles_are_read_at_every_mint_and_survive_rotation(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A role granted after sign-in appears at the next refresh, and stays through further rotations."""
    user, session = await new_session(iam.app)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.ensure_roles(["editor"], iam.app.clock.now())
        await tx.users.grant_role(user.id, "editor", "test", iam.app.clock.now())
    token = session.refresh_token
    for _ in range(2):
        rotated = (await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=token))).session
        token = rotated.refresh_token
        verified = await stub.VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=rotated.access_token)
        )
        assert list(verified.roles) == ["editor", "user"]


async def test_disabled_users_lose_refresh(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A disabled account's refresh answers SESSION_REVOKED."""
    user, session = await new_session(iam.app)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_status(user.id, "disabled", iam.app.clock.now())
    assert (await refresh_error(stub, session.refresh_token))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )


@pytest.mark.parametrize("failpoint", ["refresh.after_insert", "refresh.before_commit"])
async def test_a_database_failure_during_rotation_leaves_nothing_half_written(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub, failpoint: str
) -> None:
    """UNAVAILABLE BACKEND_UNAVAILABLE, no successor row, and the same token then rotates once normally (S33)."""
    _, session = await new_session(iam.app)
    iam.app.failpoints.arm(failpoint, "unavailable")
    try:
        assert (await refresh_error(stub, session.refresh_token))[:2] == (
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
        )
    finally:
        iam.app.failpoints.disarm(failpoint)
    async with iam.app.components.db.transaction() as tx:
        assert [t.state for t in await tx.sessions.tokens_of(session.session_id)] == ["active"]
    await iam.app.components.ephemeral.delete(
        f"rf:res:{{{iam.app.components.tokens.token_hash(session.refresh_token)}}}"
    )
    rotated = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    assert rotated.session_id == session.session_id


async def test_a_lost_answer_is_recovered_within_grace(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """The rotation committed but the answer was lost: a retry gets the same successor, nothing revoked (S33)."""
    _, session = await new_session(iam.app)
    iam.app.failpoints.arm("refresh.after_commit", "raise")
    try:
        assert (await refresh_error(stub, session.refresh_token))[:2] == (
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
        )
    finally:
        iam.app.failpoints.disarm("refresh.after_commit")
    retried = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    retried_again = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    assert retried.refresh_token == retried_again.refresh_token
    next_one = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=retried.refresh_token))
    ).session
    assert next_one.session_id == session.session_id


async def test_a_rolled_back_rotation_s_sealed_answer_is_never_served(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A rotation sealed its answer and rolled back; the next one committed but its answer was
    lost: a grace-window retry must not get the rolled-back pair (its tokens never existed)."""
    _, session = await new_session(iam.app)
    key = f"rf:res:{{{iam.app.components.tokens.token_hash(session.refresh_token)}}}"
    iam.app.failpoints.arm("refresh.before_commit", "raise")
    try:
        assert (await refresh_error(stub, session.refresh_token))[0] == grpc.StatusCode.INTERNAL
    finally:
        iam.app.failpoints.disarm("refresh.before_commit")
    rolled_back = await iam.app.components.ephemeral.get(key)
    assert rolled_back is not None
    committed = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    await iam.app.components.ephemeral.set(
        key, rolled_back, timedelta(seconds=30)
    )  # the committed answer is lost
    assert (await refresh_error(stub, session.refresh_token))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
    )
    after = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=committed.refresh_token))
    ).session
    assert after.session_id == session.session_id  # nothing was revoked


async def test_idle_and_absolute_lifetimes_end_sessions(backend: Backend, tmp_path: Path) -> None:
    """An unused token past the idle lifetime, and any session past the absolute one, is SESSION_EXPIRED (S34)."""
    env = {
        **backend.isolated(),
        **NO_ANOMALY_CHECKS,
        "IAM_REFRESH__IDLE_TTL": "1500ms",
        "IAM_REFRESH__ABSOLUTE_TTL": "3",
    }
    async with running_service(tmp_path, env) as running, running.channel() as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        _, idle = await new_session(running.app)
        await asyncio.sleep(1.7)
        assert await refresh_error(stub, idle.refresh_token) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "SESSION_EXPIRED",
            {"limit": "idle"},
        )
        _, busy = await new_session(running.app)
        token = busy.refresh_token
        for _ in range(10):
            try:
                token = (
                    await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=token))
                ).session.refresh_token
            except grpc.aio.AioRpcError as error:
                details = error_details(error)
                assert (details.reason, details.metadata) == ("SESSION_EXPIRED", {"limit": "absolute"})
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("continuous refreshing outlived the absolute lifetime")


# ending sessions ------------------------------------------------------------------------------


async def test_logout_is_idempotent_and_needs_no_access_token(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """Logout twice answers OK twice; the session's tokens then fail (S35)."""
    _, session = await new_session(iam.app)
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        for _ in range(2):
            assert (
                await auth.Logout(
                    auth_pb2.LogoutRequest(client=client(), refresh_token=session.refresh_token)
                )
                == auth_pb2.LogoutResponse()
            )
        await auth.Logout(
            auth_pb2.LogoutRequest(client=client(), refresh_token="iamr_" + secrets.token_urlsafe(32))
        )
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await auth.Logout(auth_pb2.LogoutRequest(client=client(), refresh_token="not a token"))
    assert error_details(malformed.value).field_violations == {
        "refresh_token": "must be a refresh token (iamr_ and 43 characters)"
    }
    assert await verify_error(stub, session.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )
    assert (await refresh_error(stub, session.refresh_token))[1] == "SESSION_REVOKED"


async def test_revoking_someone_elses_session_changes_nothing(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """RevokeSession with a foreign id answers OK and that session still refreshes; one's own ends (S35)."""
    _, mine = await new_session(iam.app)
    _, theirs = await new_session(iam.app)
    await stub.RevokeSession(
        token_pb2.RevokeSessionRequest(access_token=mine.access_token, session_id=theirs.session_id)
    )
    assert (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=theirs.refresh_token))
    ).session.session_id == theirs.session_id
    _, other_of_mine = await new_session(iam.app, await _user(iam, mine.user_id))
    await stub.RevokeSession(
        token_pb2.RevokeSessionRequest(access_token=mine.access_token, session_id=other_of_mine.session_id)
    )
    assert await verify_error(stub, other_of_mine.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )


async def _user(iam: RunningService, user_id: str) -> Any:
    async with iam.app.components.db.transaction() as tx:
        return await tx.users.get(user_id)


async def test_revoke_all_sessions_keeps_the_current_one_when_asked(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """The panic button ends every other session and distrusts the other devices."""
    user, current = await new_session(iam.app)
    _, phone = await new_session(iam.app, user, user_agent=IPHONE)
    await stub.RevokeAllSessions(
        token_pb2.RevokeAllSessionsRequest(access_token=current.access_token, keep_current=True)
    )
    assert await verify_error(stub, phone.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )
    assert (
        await stub.VerifyAccessToken(token_pb2.VerifyAccessTokenRequest(access_token=current.access_token))
    ).user_id == user.id
    async with iam.app.components.db.transaction() as tx:
        links = {link.device_id: link for link in await tx.devices.links_of(user.id)}
    assert links[phone.device_id].trust_revoked_at is not None
    assert links[current.device_id].trust_revoked_at is None
    await stub.RevokeAllSessions(
        token_pb2.RevokeAllSessionsRequest(access_token=current.access_token, keep_current=False)
    )
    assert await verify_error(stub, current.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )


async def test_list_sessions_shows_live_sessions_newest_first(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """Each live session with a device label, browser and OS, times and the current flag; never IPs."""
    user, laptop = await new_session(iam.app)
    _, phone = await new_session(iam.app, user, user_agent=IPHONE)
    _, ended = await new_session(iam.app, user)
    await stub.RevokeSession(
        token_pb2.RevokeSessionRequest(access_token=laptop.access_token, session_id=ended.session_id)
    )
    listed = (
        await stub.ListSessions(token_pb2.ListSessionsRequest(access_token=laptop.access_token))
    ).sessions
    assert [s.session_id for s in listed] == [phone.session_id, laptop.session_id]
    assert [s.current for s in listed] == [False, True]
    assert listed[0].device_label == "Mobile Safari on iOS (mobile)"
    assert (listed[1].browser_family, listed[1].os_family, listed[1].device_type) == (
        "Firefox",
        "Ubuntu",
        "desktop",
    )
    assert "198.51" not in str(listed)


async def test_the_session_cap_evicts_the_least_recently_used(backend: Backend, tmp_path: Path) -> None:
    """Opening one session more than sessions.max_per_user ends the one refreshed longest ago."""
    async with (
        running_service(tmp_path, {**backend.isolated(), "IAM_SESSIONS__MAX_PER_USER": "3"}) as running,
        running.channel() as channel,
    ):
        stub = token_pb2_grpc.TokenServiceStub(channel)
        user, oldest = await new_session(running.app)
        for _ in range(2):
            await new_session(running.app, user)
        _, newest = await new_session(running.app, user)
        assert await verify_error(stub, oldest.access_token) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "SESSION_REVOKED",
        )
        listed = (
            await stub.ListSessions(token_pb2.ListSessionsRequest(access_token=newest.access_token))
        ).sessions
        assert len(listed) == 3


# deny-lists ------------------------------------------------------------------------------------


async def test_revocations_survive_a_flushed_store(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """Deleting every deny-list marker only lasts until the replay job rewrites them from SQL (S24)."""
    _, session = await new_session(iam.app)
    async with iam.channel() as channel:
        await auth_pb2_grpc.AuthServiceStub(channel).Logout(
            auth_pb2.LogoutRequest(client=client(), refresh_token=session.refresh_token)
        )
    await iam.app.components.ephemeral.delete(sid_key(session.session_id))
    if iam.app.components.denylist.mirror is None:  # the in-process store: the entry was all
        assert (
            await stub.VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
            )
        ).session_id
    else:  # with Redis, the worker's own copy (loaded from SQL, fed by the feed) still holds it
        assert await verify_error(stub, session.access_token) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "SESSION_REVOKED",
        )
    assert await iam.app.components.denylist.replay() >= 1
    assert await verify_error(stub, session.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )


async def test_single_tokens_can_be_revoked_by_jti(
    iam: RunningService, stub: token_pb2_grpc.TokenServiceStub
) -> None:
    """A deny:jti entry makes that access token TOKEN_INVALID (refresh to get another)."""
    _, session = await new_session(iam.app)
    claims = jwt.decode(session.access_token, options={"verify_signature": False})
    await iam.app.components.denylist.revoke_tokens([claims["jti"]])
    assert await verify_error(stub, session.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
    )
    fresh = (
        await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
    ).session
    assert (
        await stub.VerifyAccessToken(token_pb2.VerifyAccessTokenRequest(access_token=fresh.access_token))
    ).session_id


async def test_tokens_survive_a_restart(backend: Backend, tmp_path: Path) -> None:
    """Nothing about an access or refresh token lives in process memory (behaviour.md 1.1)."""
    environ = {**backend.isolated(), **NO_ANOMALY_CHECKS}
    async with running_service(tmp_path, environ) as first:
        _, session = await new_session(first.app)
    async with running_service(tmp_path, environ) as second, second.channel() as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        assert (
            await stub.VerifyAccessToken(
                token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
            )
        ).session_id
        assert (
            await stub.Refresh(token_pb2.RefreshRequest(client=client(), refresh_token=session.refresh_token))
        ).session


async def test_sql_database_does_not_contain_refresh_tokens(iam: RunningService) -> None:
    """No column of refresh_tokens holds a token or a piece of it (S28)."""
    _, session = await new_session(iam.app)
    async with iam.app.components.db.transaction() as tx:
        rows = (await tx.connection.execute(text("SELECT * FROM refresh_tokens"))).all()  # type: ignore[attr-defined]
    dump = repr(rows)
    assert session.refresh_token[5:20] not in dump
