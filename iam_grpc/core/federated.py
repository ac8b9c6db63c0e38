"""Sign-in with another provider's OpenID Connect ID token, verified by us (never a profile
taken on trust from the BFF), and the identities linked to a user.

- A known identity (provider, subject) signs its user in through the login pipeline: like a
  password, the token is one factor, so a new device or a risky sign-in gets an MFA challenge.
- An unknown identity whose email has no account creates the account and answers a Session on
  a device trusted from now on (there is no earlier device to distrust), when the provider says
  the address is verified; otherwise ``ACCOUNT_LINK_REQUIRED`` (sign up another way, then link):
  an account made on an unproved address would wait for its real owner with the identity still
  linked (pre-account takeover).
- An unknown identity whose email belongs to an account is linked only when the token says
  ``email_verified`` and the account's address is verified too; otherwise
  ``ACCOUNT_LINK_REQUIRED``: whoever controls an unverified address at one side must not get
  the account at the other. After linking, the sign-in continues as for a known identity.
- ``LinkIdentity`` adds a provider to a signed-in user (``IDENTITY_TAKEN`` when the subject
  belongs to someone else); ``UnlinkIdentity`` never removes the last way to sign in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.federated_claims import IdClaims, IdTokenVerifier
from iam_grpc.core.login import LoginFlow, LoginResult
from iam_grpc.core.observation import LearningPolicy, Observer, learned
from iam_grpc.core.ratelimit import ip_key
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.sign_in_methods import keep_a_way_in
from iam_grpc.core.signed_in import signed_in
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import (
    AccountLinkRequired,
    IdentityTaken,
    IdTokenInvalid,
    InvalidCredentials,
)
from iam_grpc.ids import new_ulid
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Conflict, Ephemeral, Transaction
from iam_grpc.storage.records import IdentityRecord, User

__all__ = ["FederatedPolicy", "FederatedSignIn"]

log = component_logger("iam.federated")

_MAX_TOKEN = 16 * 1024
_MAX_NONCE = 512


@dataclass(frozen=True, slots=True)
class FederatedPolicy:
    default_roles: tuple[str, ...]  # roles.default, as at signup
    learning: LearningPolicy
    max_auth_age: timedelta  # linking or unlinking needs a recent sign-in (email_change's)
    leeway: timedelta  # oidc.leeway: a used token is remembered this long past its expiry


_PROVIDER = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")


def _check_provider(violations: Violations, provider: str) -> None:
    if not _PROVIDER.match(provider):
        violations.add("provider", "must be a configured provider name (1-32 of A-Z a-z 0-9 _ -)")


def _check(violations: Violations, provider: str, id_token: str, nonce: str) -> None:
    _check_provider(violations, provider)
    if not id_token or len(id_token) > _MAX_TOKEN:
        violations.add("id_token", f"must be a JWT of at most {_MAX_TOKEN} characters")
    if not nonce or len(nonce) > _MAX_NONCE:
        violations.add("nonce", f"must be the authorization request's nonce, 1 to {_MAX_NONCE} characters")
    violations.raise_any()


class FederatedSignIn:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        verifier: IdTokenVerifier,
        access: AccessTokens,
        sessions: Sessions,
        login: LoginFlow,
        observer: Observer,
        policy: FederatedPolicy,
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._verifier = verifier
        self._access = access
        self._sessions = sessions
        self._login = login
        self._observer = observer
        self._policy = policy

    async def _verify(self, client: ClientInfo, provider: str, id_token: str, nonce: str) -> IdClaims:
        """The token's claims; a refused token counts against ``oauth.ip_fail``."""
        permit = await self._run.limiter.hit("oauth.ip_fail", ip_key(client.ip))
        try:
            claims = await self._verifier.verify(provider, id_token, nonce)
            await self._use_once(id_token, claims)
        except IdTokenInvalid:
            async with self._run.db.transaction() as tx:
                await self._run.audit.record(
                    self._run.audit.event("oauth.failure", "fail", details={"provider": provider}), tx
                )
            raise
        await permit.succeeded()
        return claims

    async def _use_once(self, id_token: str, claims: IdClaims) -> None:
        """An ID token works once, on any replica: one that leaked from a log or a proxy cannot
        be replayed while it is still valid. Remembered until its expiry and the leeway."""
        digest = hashlib.sha256(id_token.encode()).hexdigest()
        left = claims.expires_at - self._run.clock.now().timestamp()
        ttl = timedelta(seconds=max(1.0, left)) + self._policy.leeway
        if not await self._ephemeral.set_if_absent(f"oidc:used:{{{digest}}}", b"1", ttl):
            log.bind(provider=claims.provider).info("id token replayed")
            raise IdTokenInvalid()

    async def sign_in(
        self, client: ClientInfo, provider: str, id_token: str, nonce: str, violations: Violations
    ) -> LoginResult:
        _check(violations, provider, id_token, nonce)
        claims = await self._verify(client, provider, id_token, nonce)
        async with self._run.db.transaction(read_only=True) as tx:
            known = await tx.identities.by_subject(provider, claims.subject)
            user = await tx.users.get(known.user_id) if known is not None else None
        if known is not None:
            if user is None or user.status != "active":
                raise InvalidCredentials()
            return await self._login.proven(user, client, second_factor=False)
        email = check_email(Violations(), "email", claims.email) if claims.email else None
        if email is None:
            log.bind(provider=provider).info("id token without a usable email for a new identity")
            raise IdTokenInvalid()
        async with self._run.db.transaction(read_only=True) as tx:
            holder = await tx.users.get_by_email(email.norm)
        if holder is None:
            if not claims.email_verified:
                # An account made on an address nobody proved would be waiting for its owner, with
                # this identity still linked after they reset the password into it.
                raise AccountLinkRequired()
            return await self._create(client, claims, email.display, email.norm)
        if holder.status != "active":
            raise InvalidCredentials()
        if not (claims.email_verified and holder.email_verified_at is not None):
            raise AccountLinkRequired()
        await self._link(holder, claims, session_id=None)
        return await self._login.proven(holder, client, second_factor=False)

    async def _create(self, client: ClientInfo, claims: IdClaims, display: str, norm: str) -> LoginResult:
        now = self._run.clock.now()
        user = User(
            id=new_ulid(now),
            email=display,
            email_norm=norm,
            password_hash=None,
            pepper_id=0,
            name=claims.name or display.split("@", 1)[0][:100],
            last_name=claims.last_name,
            locale=client.accept_language or None,
            email_verified_at=now,  # the provider vouched for it (checked above)
            terms_accepted_at=now,
            created_at=now,
            updated_at=now,
        )
        seen = self._observer.observe(client)
        try:
            async with self._run.db.transaction() as tx:
                await tx.users.insert(user)
                for role in self._policy.default_roles:
                    await tx.users.grant_role(user.id, role, "federated", now)
                await tx.identities.insert(_identity(user.id, claims, now))
                issued, evicted = await self._sessions.open_session(
                    tx,
                    user,
                    client,
                    trust_device=True,
                    shape_link=lambda link: learned(link, seen, client.ip, now, self._policy.learning),
                )
                await self._run.audit.record(
                    self._run.audit.event(
                        "user.signup",
                        "ok",
                        user_id=user.id,
                        session_id=issued.session_id,
                        device_id=issued.device_id,
                        details={"provider": claims.provider},
                    ),
                    tx,
                )
        except Conflict:
            # the address or the identity was taken meanwhile (a parallel first sign-in)
            raise AccountLinkRequired() from None
        await self._sessions.after_revocations(evicted)
        log.bind(user_id=user.id, provider=claims.provider).info("signed up with an identity")
        return LoginResult(issued, None, False)

    async def _link(self, user: User, claims: IdClaims, *, session_id: str | None) -> IdentityRecord:
        now = self._run.clock.now()
        identity = _identity(user.id, claims, now)
        try:
            async with self._run.db.transaction() as tx:
                await self._insert_identity(tx, identity)
                await self._run.audit.record(
                    self._run.audit.event(
                        "identity.linked",
                        "ok",
                        user_id=user.id,
                        session_id=session_id,
                        details={"provider": claims.provider},
                    ),
                    tx,
                )
        except Conflict:
            raise IdentityTaken() from None
        return identity

    async def _insert_identity(self, tx: Transaction, identity: IdentityRecord) -> None:
        holder = await tx.identities.by_subject(identity.provider, identity.subject)
        if holder is not None and holder.user_id != identity.user_id:
            raise IdentityTaken()
        if holder is not None:
            return  # linked already: nothing to do
        if any(i.provider == identity.provider for i in await tx.identities.of_user(identity.user_id)):
            raise IdentityTaken()  # one identity per provider: unlink the other first
        await tx.identities.insert(identity)

    async def link(
        self,
        client: ClientInfo,
        access_token: str,
        provider: str,
        id_token: str,
        nonce: str,
        violations: Violations,
    ) -> IdentityRecord:
        _check(violations, provider, id_token, nonce)
        claims_token, user = await signed_in(
            self._run, self._access, client, access_token, max_auth_age=self._policy.max_auth_age
        )
        claims = await self._verify(client, provider, id_token, nonce)
        return await self._link(user, claims, session_id=claims_token.session_id)

    async def unlink(
        self, client: ClientInfo, access_token: str, provider: str, violations: Violations
    ) -> None:
        _check_provider(violations, provider)
        violations.raise_any()
        claims, user = await signed_in(
            self._run, self._access, client, access_token, max_auth_age=self._policy.max_auth_age
        )
        async with self._run.db.transaction() as tx:
            linked = [i for i in await tx.identities.of_user(user.id) if i.provider == provider]
            if not linked:
                return
            await keep_a_way_in(tx, user.id, removing="identity")
            await tx.identities.delete(user.id, provider)
            await self._run.audit.record(
                self._run.audit.event(
                    "identity.unlinked",
                    "ok",
                    user_id=user.id,
                    session_id=claims.session_id,
                    details={"provider": provider},
                ),
                tx,
            )

    async def identities(self, user_id: str) -> list[IdentityRecord]:
        async with self._run.db.transaction(read_only=True) as tx:
            return await tx.identities.of_user(user_id)


def _identity(user_id: str, claims: IdClaims, now: datetime) -> IdentityRecord:
    return IdentityRecord(
        user_id=user_id,
        provider=claims.provider,
        subject=claims.subject,
        email=claims.email[:254],
        linked_at=now,
    )
