"""Events (api.md EventService): what other services may react to.

An event is a row of the event outbox written in the transaction of the change it describes
(``Transaction.events.append``). Most changes already write an audit row in that transaction;
:data:`FROM_AUDIT` names the audit rows that are also events, so :class:`~iam_grpc.core.audit.AuditTrail`
writes both together and a flow needs no second call. Changes without an audit row in their
transaction append their event themselves (``keys.rotated`` in ``KeyRing.rotate``).

An event's data is an allow-list of the audit row's details (:data:`DATA_FIELDS`): events leave
the service (webhooks, NATS), so nothing else of the details, and never a secret, goes with them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DATA_FIELDS", "FROM_AUDIT", "KIND", "KINDS", "event_data"]

KINDS = frozenset(
    {
        "user.created",
        "user.updated",
        "user.disabled",
        "user.enabled",
        "user.deleted",
        "email.changed",
        "password.changed",
        "password.reset",
        "session.created",
        "session.revoked",
        "session.reuse_detected",
        "account.guarded",
        "mfa.challenged",
        "mfa.completed",
        "role.granted",
        "role.revoked",
        "api_token.created",
        "api_token.revoked",
        "api_token.rotated",
        "keys.rotated",
        # a way to sign in added or taken away: what a security team watches for on an account
        "email.verified",
        "totp.enabled",
        "totp.disabled",
        "passkey.registered",
        "passkey.deleted",
        "identity.linked",
        "identity.unlinked",
    }
)
"""The kinds api.md lists, ``api_token.rotated`` and the sign-in method changes; a watcher's
filter may name only these."""

KIND = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+\Z")
"""The shape of a kind name (also the NATS subject suffix: no wildcards, no spaces)."""

FROM_AUDIT: Mapping[str, tuple[str, ...]] = {
    "user.signup": ("user.created",),
    "email.changed": ("email.changed",),
    "password.changed": ("password.changed",),
    "password.reset": ("password.reset",),
    "session.created": ("session.created",),
    "session.revoked": ("session.revoked",),
    # a replayed refresh token: the session ends (its own session.revoked row) and the account is
    # held for MFA (users.mfa_hold_until, set in the same transaction)
    "refresh.reuse_detected": ("session.reuse_detected", "account.guarded"),
    "login.mfa_required": ("mfa.challenged",),
    "anomaly.challenge": ("mfa.challenged",),
    "mfa.verified": ("mfa.completed",),
    "roles.granted": ("role.granted",),
    "roles.revoked": ("role.revoked",),
    # the user directory and API tokens (UserService, ApiTokenService, and the CLI's users commands)
    "user.updated": ("user.updated",),
    "user.disabled": ("user.disabled",),
    "user.enabled": ("user.enabled",),
    "user.deleted": ("user.deleted",),
    "api_token.created": ("api_token.created",),
    "api_token.revoked": ("api_token.revoked",),
    "api_token.rotated": ("api_token.rotated",),
    # sign-in methods (email verification, TOTP, passkeys, other providers' identities)
    "email.verified": ("email.verified",),
    "mfa.totp_enabled": ("totp.enabled",),
    "mfa.totp_disabled": ("totp.disabled",),
    "passkey.registered": ("passkey.registered",),
    "passkey.deleted": ("passkey.deleted",),
    "identity.linked": ("identity.linked",),
    "identity.unlinked": ("identity.unlinked",),
}
"""Audit row type -> the event kinds written with it, in the same transaction."""

DATA_FIELDS = (
    "reason",
    "role",
    "all",
    "now",
    "kind",
    "sessions_ended",
    "by",
    "pending",
    "end_sessions",
    "fields",
    "token_id",
    "passkey_id",
    "provider",
)
"""Audit details an event carries, when present."""


def event_data(details: Mapping[str, Any]) -> dict[str, Any]:
    """The allow-listed part of an audit row's details."""
    return {name: details[name] for name in DATA_FIELDS if name in details}
