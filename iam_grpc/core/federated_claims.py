"""What a verified ID token says, and the port that verifies one (the adapter is
``iam_grpc.oidc``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["IdClaims", "IdTokenVerifier"]


@dataclass(frozen=True, slots=True)
class IdClaims:
    provider: str
    subject: str
    email: str  # empty when the provider sent none
    email_verified: bool
    name: str = ""
    last_name: str = ""
    expires_at: float = 0.0  # the token's exp (Unix time): how long its single use is remembered


class IdTokenVerifier(Protocol):
    def knows(self, provider: str) -> bool: ...

    async def verify(self, provider: str, id_token: str, nonce: str) -> IdClaims:
        """The claims of a valid token, else :class:`~iam_grpc.errors.IdTokenInvalid`."""
        ...
