"""The signed-in user's own account: GetMe, UpdateProfile and DeleteMyAccount.

UpdateProfile follows the field mask (``name``, ``last_name``, ``locale``), with Signup's rules
for names (NFKC, 1-100 characters for ``name``, 0-100 for ``last_name``, no control or format
characters) and a BCP 47 tag of at most 35 characters (or empty) for ``locale``. DeleteMyAccount
needs a step-up grant for ``delete-account`` from the same session, consumed once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.sign_in_methods import SignInMethods, sign_in_methods
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.core.user_access import UserAccess
from iam_grpc.core.validation import MAX_LANGUAGE_TAG, Violations, check_name
from iam_grpc.errors import InvalidArgument, SessionRevoked
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User

__all__ = ["DELETE_ACCOUNT", "ProfileChanges", "Profiles", "UserProfile", "profile_of"]

DELETE_ACCOUNT = "delete-account"
_MASK_PATHS = ("name", "last_name", "locale")
_LOCALE = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*\Z")


@dataclass(frozen=True, slots=True)
class UserProfile:
    """A user as other services see it (``iam.v1.User``): never a hash, a secret or a fingerprint."""

    user: User
    roles: list[str]
    methods: SignInMethods


@dataclass(frozen=True, slots=True)
class ProfileChanges:
    paths: Sequence[str]
    name: str
    last_name: str
    locale: str


async def profile_of(tx: Transaction, user: User, roles: list[str] | None = None) -> UserProfile:
    """The profile of ``user`` read in ``tx`` (``roles`` when already known)."""
    if roles is None:
        roles = await tx.users.roles_of(user.id)
    return UserProfile(user, sorted(roles), await sign_in_methods(tx, user))


def _changes(form: ProfileChanges) -> dict[str, Any]:
    violations = Violations()
    if not form.paths:
        violations.add("update_mask", "name the fields to change: name, last_name, locale")
    unknown = [p for p in form.paths if p not in _MASK_PATHS]
    if unknown:
        violations.add("update_mask", "only name, last_name and locale can be changed")
    changes: dict[str, Any] = {}
    if "name" in form.paths:
        changes["name"] = check_name(violations, "name", form.name, required=True)
    if "last_name" in form.paths:
        changes["last_name"] = check_name(violations, "last_name", form.last_name, required=False)
    if "locale" in form.paths:
        tag = form.locale.strip()
        if tag and (len(tag) > MAX_LANGUAGE_TAG or not _LOCALE.match(tag)):
            violations.add("locale", "must be empty or a BCP 47 language tag of at most 35 characters")
        changes["locale"] = tag or None
    violations.raise_any()
    return changes


class Profiles:
    def __init__(self, run: Runtime, access: AccessTokens, step_up: StepUp, user_access: UserAccess) -> None:
        self._run = run
        self._access = access
        self._step_up = step_up
        self._user_access = user_access

    async def _owner(self, tx: Transaction, claims: AccessClaims) -> User:
        user = await tx.users.get(claims.user_id)
        if user is None or user.status != "active":
            raise SessionRevoked()
        return user

    async def get_me(self, client: ClientInfo, access_token: str) -> UserProfile:
        claims = await self._access.verify_from_device(access_token, client.device_id)
        async with self._run.db.transaction(read_only=True) as tx:
            return await profile_of(tx, await self._owner(tx, claims))

    async def update(self, client: ClientInfo, access_token: str, form: ProfileChanges) -> UserProfile:
        changes = _changes(form)
        claims = await self._access.verify_from_device(access_token, client.device_id)
        await self._run.limiter.hit("profile.user", claims.user_id)
        audit = self._run.audit
        async with self._run.db.transaction() as tx:
            await self._owner(tx, claims)
            if not await tx.directory.update_profile(claims.user_id, changes, self._run.clock.now()):
                raise SessionRevoked()
            fields = sorted(changes)
            await audit.record(
                audit.event(
                    "user.updated",
                    "ok",
                    user_id=claims.user_id,
                    session_id=claims.session_id,
                    details={"fields": fields},
                ),
                tx,
            )
            user = await self._owner(tx, claims)
            return await profile_of(tx, user)

    async def delete_my_account(self, client: ClientInfo, access_token: str, grant_token: str) -> None:
        claims = await self._access.verify_from_device(access_token, client.device_id)
        user_id, session_id = await self._step_up.consume(grant_token, DELETE_ACCOUNT)
        if (user_id, session_id) != (claims.user_id, claims.session_id):
            raise InvalidArgument.one("step_up_grant", "was granted to another session")
        if await self._user_access.erase(claims.user_id, details={"by": "user"}) is None:
            raise SessionRevoked()
