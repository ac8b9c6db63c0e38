"""Sign-in with another provider's ID token, verified by the service against a local OpenID
Connect stand-in (its own keys, its JWKS over HTTP): first sign-in, MFA on a new device, every
kind of bad token, linking to an unverified account, key rotation, LinkIdentity and
UnlinkIdentity (never the last way to sign in)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from iam_grpc.config import load_settings
from iam_grpc.errors import IdTokenInvalid
from iam_grpc.oidc import OidcVerifier
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, mfa_pb2, mfa_pb2_grpc
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import account_env, client, failure, new_email, signup
from tests.conftest import Backend
from tests.integration.test_passkeys import registered
from tests.mailbox import Mailbox
from tests.oidc_provider import OidcProvider
from tests.sessions_helper import IPHONE

LIMITS = {"oauth.ip": {"windows": ["1000/1s"]}, "oauth.ip_fail": {"windows": ["1000/1h f"]}}

Stubs = tuple[auth_pb2_grpc.AuthServiceStub, mfa_pb2_grpc.MfaServiceStub]


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    stand_in = OidcProvider()
    stand_in.start()
    yield stand_in
    stand_in.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    env = account_env(
        backend,
        mailbox,
        LIMITS,
        IAM_OIDC_PROVIDERS=provider.settings(),
        IAM_OIDC__JWKS_REFETCH_INTERVAL="0s",
    )
    async with running_service(tmp_path_factory.mktemp("federated"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stubs(iam: RunningService) -> AsyncIterator[Stubs]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel), mfa_pb2_grpc.MfaServiceStub(channel)


def sign_in(
    auth: auth_pb2_grpc.AuthServiceStub,
    id_token: str,
    nonce: str,
    context: common_pb2.ClientContext | None = None,
    provider: str = "acme",
) -> grpc.aio.UnaryUnaryCall[auth_pb2.SignInWithIdTokenRequest, auth_pb2.SignInWithIdTokenResponse]:
    return auth.SignInWithIdToken(
        auth_pb2.SignInWithIdTokenRequest(
            client=context or client(), provider=provider, id_token=id_token, nonce=nonce
        )
    )


def subject() -> str:
    return f"sub-{secrets.token_hex(6)}"


async def test_the_first_sign_in_creates_the_account_and_a_new_device_needs_mfa(
    iam: RunningService, stubs: Stubs, provider: OidcProvider
) -> None:
    """A Session for the new user (identity linked, address verified, no password); the same
    identity on the same device signs in again; from another device: an MFA challenge."""
    auth, _ = stubs
    email, sub, nonce = new_email(), subject(), secrets.token_urlsafe(16)
    first = await sign_in(auth, provider.token(sub, nonce, email=email), nonce)
    assert first.WhichOneof("result") == "session"
    async with iam.app.components.db.transaction() as tx:
        user = await tx.users.get(first.session.user_id)
        identities = await tx.identities.of_user(first.session.user_id)
    assert user is not None
    assert user.password_hash is None
    assert user.email_verified_at is not None
    assert [(i.provider, i.subject, i.email) for i in identities] == [("acme", sub, email)]
    again = await sign_in(auth, provider.token(sub, nonce), nonce, client(device_id=first.session.device_id))
    assert (again.WhichOneof("result"), again.session.user_id) == ("session", first.session.user_id)
    elsewhere = await sign_in(auth, provider.token(sub, nonce), nonce, client(ip="203.0.113.77", ua=IPHONE))
    assert elsewhere.WhichOneof("result") == "mfa"
    assert elsewhere.mfa.reason == "NEW_DEVICE"


@pytest.mark.parametrize(
    "bad",
    ["audience", "nonce", "issuer", "expired", "other-key", "unknown-provider", "garbage"],
)
async def test_a_token_that_does_not_verify_is_id_token_invalid(
    stubs: Stubs, provider: OidcProvider, bad: str
) -> None:
    """Wrong audience, nonce or issuer, expired beyond the leeway, signed by a key the provider
    does not publish, a provider not configured, not a JWT: UNAUTHENTICATED ID_TOKEN_INVALID."""
    auth, _ = stubs
    sub, nonce, email = subject(), secrets.token_urlsafe(16), new_email()
    token = provider.token(sub, nonce, email=email)
    name = "acme"
    if bad == "audience":
        token = provider.token(sub, nonce, email=email, audience="someone-else")
    elif bad == "nonce":
        nonce = "another-nonce"
    elif bad == "issuer":
        token = provider.token(sub, nonce, email=email, issuer="https://evil.example")
    elif bad == "expired":
        token = provider.token(sub, nonce, email=email, issued_ago=1000, lifetime=300)
    elif bad == "other-key":
        token = provider.token(sub, nonce, email=email, key=ec.generate_private_key(ec.SECP256R1()))
    elif bad == "unknown-provider":
        name = "nobody"
    else:
        token = "not.a.jwt"
    code, details = await failure(sign_in(auth, token, nonce, provider=name))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "ID_TOKEN_INVALID")


async def test_an_existing_account_is_linked_only_when_both_sides_are_verified(
    iam: RunningService, stubs: Stubs, provider: OidcProvider
) -> None:
    """An unverified account, or a token without email_verified: ACCOUNT_LINK_REQUIRED. Both
    verified: linked, and the account's trusted device gets a Session for that account."""
    auth, _ = stubs
    email, sub, nonce = new_email(), subject(), secrets.token_urlsafe(16)
    session = await signup(auth, email)
    code, details = await failure(sign_in(auth, provider.token(sub, nonce, email=email), nonce))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_LINK_REQUIRED")
    async with iam.app.components.db.transaction() as tx:
        await tx.users.mark_email_verified(session.user_id, iam.app.components.clock.now())
    unverified_token = provider.token(sub, nonce, email=email, email_verified=False)
    code, details = await failure(sign_in(auth, unverified_token, nonce))
    assert details.reason == "ACCOUNT_LINK_REQUIRED"
    linked = await sign_in(
        auth, provider.token(sub, nonce, email=email), nonce, client(device_id=session.device_id)
    )
    assert (linked.WhichOneof("result"), linked.session.user_id) == ("session", session.user_id)


async def test_a_rotated_key_is_fetched_when_its_kid_is_new(stubs: Stubs, provider: OidcProvider) -> None:
    """The provider publishes a new key and signs with it: the unknown kid refetches the JWKS."""
    auth, _ = stubs
    nonce = secrets.token_urlsafe(16)
    await sign_in(auth, provider.token(subject(), nonce, email=new_email()), nonce)
    before = provider.fetches
    provider.rotate()
    answer = await sign_in(auth, provider.token(subject(), nonce, email=new_email()), nonce)
    assert answer.WhichOneof("result") == "session"
    assert provider.fetches == before + 1


async def test_unknown_kids_refetch_at_most_once_per_interval(provider: OidcProvider) -> None:
    """Tokens with made-up kids cannot make the verifier hammer the provider."""
    settings = load_settings(environ={"IAM_OIDC_PROVIDERS": provider.settings()})
    verifier = OidcVerifier(settings.oidc)
    nonce = "n"
    await verifier.verify("acme", provider.token("s", nonce), nonce)
    before = provider.fetches
    stranger = ec.generate_private_key(ec.SECP256R1())
    for n in range(5):
        with pytest.raises(IdTokenInvalid):
            await verifier.verify("acme", provider.token("s", nonce, key=stranger, kid=f"made-up-{n}"), nonce)
    assert provider.fetches - before <= 1


async def test_link_and_unlink_keep_a_way_to_sign_in(stubs: Stubs, provider: OidcProvider) -> None:
    """LinkIdentity for a password user; the same identity for another user: IDENTITY_TAKEN. A
    user signed up with an ID token cannot unlink it (LAST_SIGN_IN_METHOD) until a passkey is
    registered, and then cannot delete that passkey."""
    auth, mfa = stubs
    nonce = secrets.token_urlsafe(16)
    owner = await signup(auth)
    sub = subject()
    linked = await auth.LinkIdentity(
        auth_pb2.LinkIdentityRequest(
            client=client(device_id=owner.device_id),
            access_token=owner.access_token,
            provider="acme",
            id_token=provider.token(sub, nonce),
            nonce=nonce,
        )
    )
    assert (linked.identity.provider, linked.identity.subject) == ("acme", sub)
    thief = await signup(auth)
    code, details = await failure(
        auth.LinkIdentity(
            auth_pb2.LinkIdentityRequest(
                client=client(device_id=thief.device_id),
                access_token=thief.access_token,
                provider="acme",
                id_token=provider.token(sub, nonce),
                nonce=nonce,
            )
        )
    )
    assert (code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDENTITY_TAKEN")

    federated = (await sign_in(auth, provider.token(subject(), nonce, email=new_email()), nonce)).session
    context = client(device_id=federated.device_id)
    unlink = auth_pb2.UnlinkIdentityRequest(
        client=context, access_token=federated.access_token, provider="acme"
    )
    code, details = await failure(auth.UnlinkIdentity(unlink))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_SIGN_IN_METHOD")
    await registered(mfa, federated)
    await auth.UnlinkIdentity(unlink)
    (passkey,) = (
        await mfa.ListPasskeys(
            mfa_pb2.ListPasskeysRequest(client=context, access_token=federated.access_token)
        )
    ).passkeys
    code, details = await failure(
        mfa.DeletePasskey(
            mfa_pb2.DeletePasskeyRequest(
                client=context, access_token=federated.access_token, passkey_id=passkey.passkey_id
            )
        )
    )
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_SIGN_IN_METHOD")


async def test_a_new_identity_without_an_email_creates_nothing(stubs: Stubs, provider: OidcProvider) -> None:
    """A valid token for an unknown subject that carries no email: ID_TOKEN_INVALID (an account
    needs an address)."""
    auth, _ = stubs
    nonce = secrets.token_urlsafe(16)
    code, details = await failure(sign_in(auth, provider.token(subject(), nonce), nonce))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "ID_TOKEN_INVALID")


async def test_a_disabled_users_identity_does_not_sign_in(
    iam: RunningService, stubs: Stubs, provider: OidcProvider
) -> None:
    """INVALID_CREDENTIALS, as for a password."""
    auth, _ = stubs
    sub, nonce = subject(), secrets.token_urlsafe(16)
    first = await sign_in(auth, provider.token(sub, nonce, email=new_email()), nonce)
    async with iam.app.components.db.transaction() as tx:
        await tx.users.set_status(first.session.user_id, "disabled", iam.app.components.clock.now())
    code, details = await failure(
        sign_in(auth, provider.token(sub, nonce), nonce, client(device_id=first.session.device_id))
    )
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def test_an_id_token_works_once(stubs: Stubs, provider: OidcProvider) -> None:
    """The same token again (leaked from a log or a proxy): ID_TOKEN_INVALID."""
    auth, _ = stubs
    nonce = secrets.token_urlsafe(16)
    token = provider.token(subject(), nonce, email=new_email())
    first = await sign_in(auth, token, nonce)
    assert first.WhichOneof("result") == "session"
    code, details = await failure(sign_in(auth, token, nonce, client(device_id=first.session.device_id)))
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "ID_TOKEN_INVALID")


async def test_a_new_identity_with_an_unverified_email_creates_nothing(
    iam: RunningService, stubs: Stubs, provider: OidcProvider
) -> None:
    """ACCOUNT_LINK_REQUIRED and no account: one made on an unproved address would wait for its
    owner with this identity linked."""
    auth, _ = stubs
    email, nonce = new_email(), secrets.token_urlsafe(16)
    token = provider.token(subject(), nonce, email=email, email_verified=False)
    code, details = await failure(sign_in(auth, token, nonce))
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_LINK_REQUIRED")
    async with iam.app.components.db.transaction() as tx:
        assert await tx.users.get_by_email(email) is None


async def events_of(iam: RunningService, user_id: str) -> list[tuple[str, dict[str, object]]]:
    """The user's events in the order they were written: (kind, data)."""
    async with iam.app.components.db.transaction(read_only=True) as tx:
        rows = await tx.connection.execute(
            text("SELECT kind, data FROM events WHERE user_id = :user ORDER BY pos"), {"user": user_id}
        )
        return [(kind, data if isinstance(data, dict) else json.loads(data)) for kind, data in rows]


async def test_each_change_of_a_way_to_sign_in_is_an_event(
    iam: RunningService, stubs: Stubs, provider: OidcProvider
) -> None:
    """identity.linked and identity.unlinked (data: the provider), passkey.registered and
    passkey.deleted (data: the passkey id), written with the change: what a security team watches
    for on an account (a thief adding their own way in)."""
    auth, mfa = stubs
    nonce = secrets.token_urlsafe(16)
    owner = await signup(auth)
    context = client(device_id=owner.device_id)
    await auth.LinkIdentity(
        auth_pb2.LinkIdentityRequest(
            client=context,
            access_token=owner.access_token,
            provider="acme",
            id_token=provider.token(subject(), nonce),
            nonce=nonce,
        )
    )
    await registered(mfa, owner)
    (passkey,) = (
        await mfa.ListPasskeys(mfa_pb2.ListPasskeysRequest(client=context, access_token=owner.access_token))
    ).passkeys
    await mfa.DeletePasskey(
        mfa_pb2.DeletePasskeyRequest(
            client=context, access_token=owner.access_token, passkey_id=passkey.passkey_id
        )
    )
    await auth.UnlinkIdentity(
        auth_pb2.UnlinkIdentityRequest(client=context, access_token=owner.access_token, provider="acme")
    )
    methods = [
        (kind, data.get("provider") or data.get("passkey_id"))
        for kind, data in await events_of(iam, owner.user_id)
        if kind.startswith(("identity.", "passkey."))
    ]
    assert methods == [
        ("identity.linked", "acme"),
        ("passkey.registered", passkey.passkey_id),
        ("passkey.deleted", passkey.passkey_id),
        ("identity.unlinked", "acme"),
    ]
