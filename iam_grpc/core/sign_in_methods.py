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
    """The user's second factors and linked identities. Today every user has the email channel;
    TOTP adds "totp" once an enrollment is confirmed, passkeys "passkey" while one is registered,
    and federated sign-in returns the linked identities here."""
    del tx  # read by the extensions
    return SignInMethods(mfa_methods=("email",) if user.email else (), identities=())
