"""The signed-in user behind an access token presented with its device (the RPCs a BFF calls for
a signed-in browser: passkeys, linked identities)."""

from __future__ import annotations

from datetime import timedelta

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessClaims, AccessTokens
from iam_grpc.errors import ReauthRequired, SessionRevoked
from iam_grpc.storage.records import User

__all__ = ["signed_in"]


async def signed_in(
    run: Runtime,
    access: AccessTokens,
    client: ClientInfo,
    access_token: str,
    *,
    max_auth_age: timedelta | None = None,
) -> tuple[AccessClaims, User]:
    """The token's claims and its active user; with ``max_auth_age`` the session must have
    authenticated that recently (REAUTH_REQUIRED otherwise: run a step-up and retry)."""
    claims = await access.verify_from_device(access_token, client.device_id)
    async with run.db.transaction(read_only=True) as tx:
        session = await tx.sessions.get(claims.session_id)
        user = await tx.users.get(claims.user_id)
    if session is None or session.revoked_at is not None or user is None or user.status != "active":
        raise SessionRevoked()
    if max_auth_age is not None and run.clock.now() - session.auth_at > max_auth_age:
        raise ReauthRequired()
    return claims, user
