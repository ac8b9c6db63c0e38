"""What a user can sign in and step up with, as ``User.mfa_methods`` and ``User.identities``
show it. THE HOOK for the TOTP, passkey and federated sign-in work: each extends
:func:`sign_in_methods` (one query of its own table in the same transaction) and nothing else in
the UserService or the export needs to change."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User

__all__ = ["LinkedIdentity", "SignInMethods", "sign_in_methods"]


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
