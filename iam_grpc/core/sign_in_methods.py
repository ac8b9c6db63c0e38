"""What a user can sign in and step up with: ``User.mfa_methods`` and ``User.identities`` as
:func:`sign_in_methods` shows them, and the rule that removing a passkey or a linked identity
never leaves an account without a way in (:func:`keep_a_way_in`), both read in the caller's
transaction. A new sign-in method is added to both, here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from iam_grpc.errors import LastSignInMethod
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User

__all__ = ["LinkedIdentity", "SignInMethods", "keep_a_way_in", "sign_in_methods"]


@dataclass(frozen=True, slots=True)
class LinkedIdentity:
    """One account at another identity provider linked to the user (``iam.v1.Identity``)."""

    provider: str
    subject: str
    email: str
    linked_at: datetime


@dataclass(frozen=True, slots=True)
class SignInMethods:
    mfa_methods: tuple[str, ...]  # "email", "totp", "passkey"
    identities: tuple[LinkedIdentity, ...]


async def sign_in_methods(tx: Transaction, user: User) -> SignInMethods:
    """The user's second factors and linked identities: "email" while the account has an
    address, "totp" once an authenticator app is confirmed, "passkey" while one is registered,
    and the identities of other providers linked to it."""
    methods: list[str] = ["email"] if user.email else []
    if await tx.totp.get(user.id) is not None:
        methods.append("totp")
    if await tx.passkeys.count(user.id):
        methods.append("passkey")
    identities = tuple(
        LinkedIdentity(provider=i.provider, subject=i.subject, email=i.email, linked_at=i.linked_at)
        for i in await tx.identities.of_user(user.id)
    )
    return SignInMethods(mfa_methods=tuple(methods), identities=identities)


async def keep_a_way_in(tx: Transaction, user_id: str, *, removing: Literal["passkey", "identity"]) -> None:
    """The last-method rule, read in the transaction that removes one passkey or the identity of
    one provider: raise :class:`LastSignInMethod` when the account would be left with nothing to
    sign in with (no password, no passkey, no linked identity)."""
    user = await tx.users.get(user_id)
    password = user is not None and bool(user.password_hash)
    passkeys = await tx.passkeys.count(user_id) - (removing == "passkey")
    identities = len(await tx.identities.of_user(user_id)) - (removing == "identity")
    if not password and passkeys <= 0 and identities <= 0:
        raise LastSignInMethod()
