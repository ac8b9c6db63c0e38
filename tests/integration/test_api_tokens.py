"""ApiTokenService (api.md, second round) on both backends: creation shown once, listing, revocation,
rotation, verification with scopes, addresses, expiry and typos, the per-user limits, the batched
last use, and revocations seen by a second replica at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import update

from iam_grpc.core.api_tokens import well_formed
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.proto import api_token_pb2, api_token_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.storage.sql.tables import api_tokens, sessions
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import failure
from tests.conftest import Backend
from tests.sessions_helper import FIREFOX, NO_ANOMALY_CHECKS, NO_BACKGROUND_SQL, new_session

IP = "198.51.100.10"
# Tests count SQL statements: every background job that runs SQL is pushed an hour away.
QUIET = NO_BACKGROUND_SQL


def here(session: IssuedSession, ip: str = IP) -> common_pb2.ClientContext:
    return common_pb2.ClientContext(ip=ip, user_agent=FIREFOX, device_id=session.device_id)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    env = {**backend.isolated(), **NO_ANOMALY_CHECKS, **QUIET}
    async with running_service(tmp_path_factory.mktemp("api-tokens"), env, probe_interval=3600.0) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[api_token_pb2_grpc.ApiTokenServiceStub]:
    async with iam.channel() as channel:
        yield api_token_pb2_grpc.ApiTokenServiceStub(channel)


async def create(
    stub: api_token_pb2_grpc.ApiTokenServiceStub,
    session: IssuedSession,
    *,
    scopes: tuple[str, ...] = ("repo:read",),
    cidrs: tuple[str, ...] = (),
    ttl: timedelta | None = None,
    name: str = "deploy script",
) -> api_token_pb2.CreateApiTokenResponse:
    request = api_token_pb2.CreateApiTokenRequest(
        client=here(session),
        access_token=session.access_token,
        name=name,
        scopes=list(scopes),
        allowed_cidrs=list(cidrs),
    )
    if ttl is not None:
        request.ttl.CopyFrom(Duration(seconds=int(ttl.total_seconds())))
    answer: api_token_pb2.CreateApiTokenResponse = await stub.CreateApiToken(request)
    return answer


async def verify(
    stub: api_token_pb2_grpc.ApiTokenServiceStub, secret: str, *, ip: str = "", scopes: tuple[str, ...] = ()
) -> str:
    """'OK' or the ErrorInfo reason."""
    try:
        await stub.VerifyApiToken(
            api_token_pb2.VerifyApiTokenRequest(secret=secret, ip=ip, required_scopes=list(scopes))
        )
    except grpc.aio.AioRpcError as error:
        return error_details(error).reason or error.code().name
    return "OK"


async def test_a_new_token_is_shown_once_and_verifies_with_its_scopes(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """CreateApiToken answers iam_pat_<random><checksum> once; SQL holds only a keyed hash; the list
    shows the prefix; VerifyApiToken answers the owner, id and sorted scopes."""
    _, session = await new_session(iam.app)
    created = await create(stub, session, scopes=("repo:write", "repo:read", "repo:read"))
    secret, token = created.secret, created.token
    assert well_formed(secret)
    assert secret.startswith("iam_pat_")
    assert len(secret) == 46
    assert secret.startswith(token.prefix)
    assert list(token.scopes) == ["repo:read", "repo:write"]
    async with iam.app.components.db.transaction() as tx:
        row = await tx.api_tokens.get(token.token_id)
    assert row is not None
    assert secret not in json.dumps([str(v) for v in vars_of(row)])
    listed = await stub.ListApiTokens(
        api_token_pb2.ListApiTokensRequest(client=here(session), access_token=session.access_token)
    )
    assert [t.token_id for t in listed.tokens] == [token.token_id]
    answer = await stub.VerifyApiToken(
        api_token_pb2.VerifyApiTokenRequest(secret=secret, required_scopes=["repo:read"])
    )
    assert (answer.user_id, answer.token_id, list(answer.scopes)) == (
        session.user_id,
        token.token_id,
        ["repo:read", "repo:write"],
    )


def vars_of(row: object) -> list[object]:
    return [getattr(row, name) for name in row.__dataclass_fields__]  # type: ignore[attr-defined]


async def test_a_mistyped_secret_is_refused_by_its_checksum_without_a_lookup(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """One character changed, dropped or appended: TOKEN_INVALID, and no SQL statement runs."""
    _, session = await new_session(iam.app)
    secret = (await create(stub, session)).secret
    swapped = secret[:-10] + ("B" if secret[-10] == "A" else "A") + secret[-9:]
    statements = iam.app.components.metrics.sql_statements
    before = statements._value.get()
    for typo in (swapped, secret[:-1], secret + "x", secret.replace("iam_pat_", "iam_pat-"), ""):
        assert await verify(stub, typo) == "TOKEN_INVALID"
    assert statements._value.get() == before
    assert await verify(stub, secret) == "OK"


async def test_a_missing_scope_is_named(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """PERMISSION_DENIED SCOPE_REQUIRED with metadata missing = the scopes the token lacks."""
    _, session = await new_session(iam.app)
    secret = (await create(stub, session, scopes=("repo:read",))).secret
    code, details = await failure(
        stub.VerifyApiToken(
            api_token_pb2.VerifyApiTokenRequest(
                secret=secret, required_scopes=["repo:read", "admin", "billing"]
            )
        )
    )
    assert (code, details.reason, details.metadata) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_REQUIRED",
        {"missing": "admin,billing"},
    )


async def test_a_token_with_an_address_list_works_only_from_those_networks(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """allowed_cidrs: an address inside passes; outside, or none, answers IP_NOT_ALLOWED."""
    _, session = await new_session(iam.app)
    secret = (await create(stub, session, cidrs=("203.0.113.0/24", "2001:db8::/32"))).secret
    assert await verify(stub, secret, ip="203.0.113.77") == "OK"
    assert await verify(stub, secret, ip="2001:db8::1") == "OK"
    assert await verify(stub, secret, ip="::ffff:203.0.113.5") == "OK"  # IPv4-mapped is IPv4
    assert await verify(stub, secret, ip="198.51.100.1") == "IP_NOT_ALLOWED"
    code, details = await failure(stub.VerifyApiToken(api_token_pb2.VerifyApiTokenRequest(secret=secret)))
    # the loopback caller relays addresses; without one, the peer (127.0.0.1) is not in the list
    assert (code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "IP_NOT_ALLOWED")


async def test_an_expired_token_answers_token_expired(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """A token past its expiry: TOKEN_EXPIRED (and no longer listed)."""
    _, session = await new_session(iam.app)
    created = await create(stub, session, ttl=timedelta(hours=1))
    assert created.token.expires_at.ToDatetime() > created.token.created_at.ToDatetime()
    past = iam.app.clock.now() - timedelta(seconds=1)
    async with iam.app.components.db.transaction() as tx:
        await tx.connection.execute(  # type: ignore[attr-defined]
            update(api_tokens).where(api_tokens.c.id == created.token.token_id).values(expires_at=past)
        )
    assert await verify(stub, created.secret) == "TOKEN_EXPIRED"
    listed = await stub.ListApiTokens(
        api_token_pb2.ListApiTokensRequest(client=here(session), access_token=session.access_token)
    )
    assert list(listed.tokens) == []


async def test_revocation_ends_a_token_at_once_even_after_a_cached_check(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """Verified (now remembered in memory), revoked: the next check answers TOKEN_INVALID. Revoking
    an unknown token or another user's changes nothing and answers OK."""
    _, session = await new_session(iam.app)
    _, other = await new_session(iam.app)
    created = await create(stub, session)
    assert await verify(stub, created.secret) == "OK"
    await stub.RevokeApiToken(
        api_token_pb2.RevokeApiTokenRequest(
            client=here(other), access_token=other.access_token, token_id=created.token.token_id
        )
    )
    assert await verify(stub, created.secret) == "OK"
    revoke = api_token_pb2.RevokeApiTokenRequest(
        client=here(session), access_token=session.access_token, token_id=created.token.token_id
    )
    await stub.RevokeApiToken(revoke)
    await stub.RevokeApiToken(revoke)  # idempotent
    assert await verify(stub, created.secret) == "TOKEN_INVALID"


async def test_rotation_kills_the_old_secret_at_once_and_keeps_the_token(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """RotateApiToken: same id, name and scopes; the new secret verifies, the old one (even
    remembered in memory) does not; another user's token id is INVALID_ARGUMENT."""
    _, session = await new_session(iam.app)
    _, other = await new_session(iam.app)
    created = await create(stub, session)
    assert await verify(stub, created.secret) == "OK"
    rotate = api_token_pb2.RotateApiTokenRequest(
        client=here(session), access_token=session.access_token, token_id=created.token.token_id
    )
    rotated = await stub.RotateApiToken(rotate)
    assert rotated.token.token_id == created.token.token_id
    assert rotated.secret != created.secret
    assert rotated.secret.startswith(rotated.token.prefix)
    assert await verify(stub, created.secret) == "TOKEN_INVALID"
    assert await verify(stub, rotated.secret) == "OK"
    code, details = await failure(
        stub.RotateApiToken(
            api_token_pb2.RotateApiTokenRequest(
                client=here(other), access_token=other.access_token, token_id=created.token.token_id
            )
        )
    )
    assert (code, details.field_violations.keys()) == (grpc.StatusCode.INVALID_ARGUMENT, {"token_id"})


async def test_twenty_live_tokens_per_user_then_token_limit(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """The 21st live token is FAILED_PRECONDITION TOKEN_LIMIT; revoking one makes room."""
    _, session = await new_session(iam.app)
    made = [await create(stub, session, name=f"token {i}") for i in range(20)]
    code, details = await failure(create(stub, session))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKEN_LIMIT")
    await stub.RevokeApiToken(
        api_token_pb2.RevokeApiTokenRequest(
            client=here(session), access_token=session.access_token, token_id=made[0].token.token_id
        )
    )
    await create(stub, session)


async def test_parallel_creations_never_exceed_the_limit(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """25 creations at once for one user: exactly 20 succeed, the others answer TOKEN_LIMIT."""
    _, session = await new_session(iam.app)
    answers = await asyncio.gather(
        *(create(stub, session, name=f"parallel {i}") for i in range(25)), return_exceptions=True
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(answers) - len(refused) == 20
    assert {error_details(e).reason for e in refused} == {"TOKEN_LIMIT"}


async def test_creation_needs_a_recent_sign_in(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """A session signed in longer ago than email_change.max_auth_age: REAUTH_REQUIRED."""
    _, session = await new_session(iam.app)
    long_ago = iam.app.clock.now() - timedelta(hours=1)
    async with iam.app.components.db.transaction() as tx:
        await tx.connection.execute(  # type: ignore[attr-defined]
            update(sessions).where(sessions.c.id == session.session_id).values(auth_at=long_ago)
        )
    code, details = await failure(create(stub, session))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED")


async def test_a_token_of_another_device_cannot_manage_tokens(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """The access token must be the device's own (client.device_id), as for every end-user RPC."""
    _, session = await new_session(iam.app)
    _, elsewhere = await new_session(iam.app)
    code, details = await failure(
        stub.ListApiTokens(
            api_token_pb2.ListApiTokensRequest(client=here(elsewhere), access_token=session.access_token)
        )
    )
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_last_use_is_written_in_batches_not_per_check(
    iam: RunningService, stub: api_token_pb2_grpc.ApiTokenServiceStub
) -> None:
    """Verifications write nothing; the list shows the noted use; the flush job writes it."""
    _, session = await new_session(iam.app)
    created = await create(stub, session)
    assert await verify(stub, created.secret) == "OK"  # first check: reads SQL, writes nothing
    statements = iam.app.components.metrics.sql_statements
    before = statements._value.get()
    for _ in range(5):
        assert await verify(stub, created.secret) == "OK"
    assert statements._value.get() == before  # answered from memory and the deny-list
    listed = await stub.ListApiTokens(
        api_token_pb2.ListApiTokensRequest(client=here(session), access_token=session.access_token)
    )
    assert listed.tokens[0].HasField("last_used_at")
    await iam.app.components.api_tokens.flush_use()
    async with iam.app.components.db.transaction() as tx:
        row = await tx.api_tokens.get(created.token.token_id)
    assert row is not None
    assert row.last_used_at is not None


async def test_creation_and_failed_checks_are_rate_limited(backend: Backend, tmp_path: Path) -> None:
    """api_token.create_user per user; api_token.caller_invalid counts failed checks per caller."""
    groups = {
        "api_token.create_user": {"windows": ["2/1h"]},
        "api_token.caller_invalid": {"windows": ["3/1m f"]},
    }
    env = {**backend.isolated(), **NO_ANOMALY_CHECKS, "IAM_RATELIMIT__GROUPS": json.dumps(groups)}
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        stub = api_token_pb2_grpc.ApiTokenServiceStub(channel)
        _, session = await new_session(iam.app)
        good = (await create(stub, session)).secret
        await create(stub, session)
        code, details = await failure(create(stub, session))
        assert (code, details.reason, details.metadata) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            {"scope": "user"},
        )
        unknown = "iam_pat_" + good[8:-6][::-1]
        answers = [await verify(stub, unknown[:-1]) for _ in range(4)]
        assert answers == ["TOKEN_INVALID"] * 3 + ["RATE_LIMITED"]
        assert await verify(stub, good) == "OK"  # successes are never counted


async def test_a_disabled_user_s_tokens_and_a_rotation_fail_on_the_other_replica_at_once(
    shared_backend: Backend, tmp_path: Path
) -> None:
    """Two replicas on one MariaDB and Redis: B has verified (and remembers) an API token and an
    access token; DisableUser on A makes both fail on B at once, and the user.disabled event is
    in the outbox; a rotation on A kills the old secret on B at once."""
    from sqlalchemy import select

    from iam_grpc.proto import user_pb2, user_pb2_grpc
    from iam_grpc.storage.sql.tables import events

    env = {**shared_backend.isolated(), **NO_ANOMALY_CHECKS}
    async with (
        running_service(tmp_path / "a", env) as a,
        running_service(tmp_path / "b", env) as b,
        a.channel() as on_a,
        b.channel() as on_b,
    ):
        tokens_a, tokens_b = (
            api_token_pb2_grpc.ApiTokenServiceStub(on_a),
            api_token_pb2_grpc.ApiTokenServiceStub(on_b),
        )
        _, rotating = await new_session(a.app)
        first = await create(tokens_a, rotating)
        assert await verify(tokens_b, first.secret) == "OK"
        rotated = await tokens_a.RotateApiToken(
            api_token_pb2.RotateApiTokenRequest(
                client=here(rotating), access_token=rotating.access_token, token_id=first.token.token_id
            )
        )
        assert await verify(tokens_b, first.secret) == "TOKEN_INVALID"
        assert await verify(tokens_b, rotated.secret) == "OK"

        user, session = await new_session(a.app)
        secret = (await create(tokens_a, session)).secret
        verify_access = token_pb2_grpc.TokenServiceStub(on_b).VerifyAccessToken
        await verify_access(token_pb2.VerifyAccessTokenRequest(access_token=session.access_token))
        assert await verify(tokens_b, secret) == "OK"
        await user_pb2_grpc.UserServiceStub(on_a).DisableUser(
            user_pb2.DisableUserRequest(user_id=user.id, reason="offboarded")
        )
        assert await verify(tokens_b, secret) == "TOKEN_INVALID"
        async with b.app.components.db.transaction() as tx:
            rows = await tx.connection.execute(  # type: ignore[attr-defined]
                select(events.c.kind, events.c.data).where(events.c.user_id == user.id)
            )
            written = [(str(kind), dict(data)) for kind, data in rows]
        assert ("user.disabled", {"reason": "offboarded"}) in written
        _code, details = await failure(
            verify_access(token_pb2.VerifyAccessTokenRequest(access_token=session.access_token))
        )
        assert details.reason == "SESSION_REVOKED"
