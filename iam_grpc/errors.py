"""The error tree. Core code raises these; only the error-mapping interceptor
turns them into gRPC statuses (code + ``google.rpc.Status`` details with an
``ErrorInfo`` in domain ``iam.v1``).

::

    IamError
    ├── ClientError                 the request is at fault; safe to show
    │   ├── InvalidArgument         INVALID_ARGUMENT     INVALID_ARGUMENT (+ BadRequest)
    │   ├── InvalidCredentials      UNAUTHENTICATED      INVALID_CREDENTIALS
    │   ├── EmailTaken              ALREADY_EXISTS       EMAIL_TAKEN
    │   ├── PasswordBreached        INVALID_ARGUMENT     PASSWORD_BREACHED
    │   ├── EmailDomainRejected     INVALID_ARGUMENT     EMAIL_DOMAIN_REJECTED
    │   ├── TokenInvalid            UNAUTHENTICATED      TOKEN_INVALID
    │   ├── TokenExpired            UNAUTHENTICATED      TOKEN_EXPIRED
    │   ├── SessionRevoked          UNAUTHENTICATED      SESSION_REVOKED
    │   ├── RefreshTokenReused      UNAUTHENTICATED      REFRESH_TOKEN_REUSED
    │   ├── AnomalyBlocked          UNAUTHENTICATED      ANOMALY_BLOCKED (metadata check)
    │   ├── SessionExpired          UNAUTHENTICATED      SESSION_EXPIRED (metadata limit)
    │   ├── RateLimited             RESOURCE_EXHAUSTED   RATE_LIMITED (+ RetryInfo, metadata scope)
    │   ├── CodeInvalid             UNAUTHENTICATED      CODE_INVALID (metadata attempts_left)
    │   ├── ChallengeExpired        FAILED_PRECONDITION  CHALLENGE_EXPIRED
    │   ├── LinkUsed                FAILED_PRECONDITION  LINK_USED
    │   ├── RoleRequired            PERMISSION_DENIED    ROLE_REQUIRED (metadata missing)
    │   ├── ReauthRequired          FAILED_PRECONDITION  REAUTH_REQUIRED
    │   ├── CallerUnknown           UNAUTHENTICATED      CALLER_UNKNOWN
    │   ├── CallerForbidden         PERMISSION_DENIED    CALLER_UNKNOWN
    │   └── NotImplementedYet       UNIMPLEMENTED        UNIMPLEMENTED
    └── ServerError                 our side is at fault; details never shown
        ├── BackendUnavailable      UNAVAILABLE          BACKEND_UNAVAILABLE
        ├── DeadlineExceeded        DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
        └── InternalError           INTERNAL             INTERNAL

Messages are short, constant English sentences: they never contain user input,
and never say whether an account exists. Any other exception reaching the
mapper becomes ``InternalError`` (logged with its traceback, shown to the caller
as the request id only).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc

__all__ = [
    "DOMAIN",
    "AnomalyBlocked",
    "BackendUnavailable",
    "CallerForbidden",
    "CallerUnknown",
    "ChallengeExpired",
    "ClientError",
    "CodeInvalid",
    "DeadlineExceeded",
    "EmailDomainRejected",
    "EmailTaken",
    "FieldViolation",
    "IamError",
    "InternalError",
    "InvalidArgument",
    "InvalidCredentials",
    "LinkUsed",
    "NotImplementedYet",
    "PasswordBreached",
    "RateLimited",
    "ReauthRequired",
    "RefreshTokenReused",
    "RoleRequired",
    "ServerError",
    "SessionExpired",
    "SessionRevoked",
    "TokenExpired",
    "TokenInvalid",
]

DOMAIN = "iam.v1"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: ``field`` is a dotted path such as ``client.ip``."""

    field: str
    description: str


class IamError(Exception):
    """Base of every error the service answers with on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    message: str = "Internal error."

    def __init__(self, message: str | None = None, *, metadata: dict[str, str] | None = None) -> None:
        if message is not None:
            self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r})"


class ClientError(IamError):
    """The request is at fault; the caller may show the message."""


class InvalidArgument(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"
    message = "The request has invalid fields."

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations)

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class InvalidCredentials(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "INVALID_CREDENTIALS"
    message = "Wrong email or password."


class EmailTaken(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "EMAIL_TAKEN"
    message = "This email address is already registered."


class PasswordBreached(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "PASSWORD_BREACHED"
    message = "This password appears in known data breaches; choose another."


class EmailDomainRejected(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "EMAIL_DOMAIN_REJECTED"
    message = "This email domain cannot receive mail or is not accepted."


class TokenInvalid(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "TOKEN_INVALID"
    message = "The token is invalid."


class TokenExpired(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "TOKEN_EXPIRED"
    message = "The token has expired."


class SessionRevoked(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "SESSION_REVOKED"
    message = "The session has ended; sign in again."


class RefreshTokenReused(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "REFRESH_TOKEN_REUSED"
    message = "The refresh token was already used; the session has been ended."


class AnomalyBlocked(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "ANOMALY_BLOCKED"
    message = "The request was blocked as anomalous; sign in again."

    def __init__(self, check: str) -> None:
        super().__init__(metadata={"check": check})


class SessionExpired(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "SESSION_EXPIRED"
    message = "The session has expired; sign in again."

    def __init__(self, limit: str) -> None:
        super().__init__(metadata={"limit": limit})


class RateLimited(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"
    message = "Too many requests; retry later."

    def __init__(self, retry_after: timedelta, scope: str) -> None:
        super().__init__(metadata={"scope": scope})
        # At least one whole second, rounded up (behaviour.md 8.4).
        seconds = max(1, -int(-retry_after.total_seconds() // 1))
        self.retry_after = timedelta(seconds=seconds)


class CodeInvalid(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "CODE_INVALID"
    message = "The code is not correct."

    def __init__(self, attempts_left: int) -> None:
        super().__init__(metadata={"attempts_left": str(attempts_left)})


class ChallengeExpired(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CHALLENGE_EXPIRED"
    message = "The challenge or link has expired or is no longer valid."


class LinkUsed(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "LINK_USED"
    message = "The link has already been used."


class RoleRequired(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ROLE_REQUIRED"
    message = "A required role is missing."

    def __init__(self, missing: list[str]) -> None:
        super().__init__(metadata={"missing": ",".join(sorted(missing))})


class ReauthRequired(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REAUTH_REQUIRED"
    message = "This action needs a recent sign-in; complete a step-up challenge and retry."


class CallerUnknown(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "CALLER_UNKNOWN"
    message = "The calling service is not authenticated."


class CallerForbidden(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "CALLER_UNKNOWN"
    message = "The calling service may not call this method."


class NotImplementedYet(ClientError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"
    message = "This method is not implemented yet."


class ServerError(IamError):
    """Our side is at fault; the caller learns nothing but the code."""

    def cause(self) -> dict[str, object]:
        """What caused it, for the log only: exception class and driver error code (no message text,
        which may carry SQL parameters)."""
        cause = self.__cause__
        if cause is None:
            return {}
        orig = getattr(cause, "orig", None)
        args = getattr(orig, "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
        return {"cause": type(cause).__name__, "driver_code": code}


class BackendUnavailable(ServerError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"
    message = "A backend is unavailable; retry later."


class DeadlineExceeded(ServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
    message = "The deadline expired before the operation could finish."


class InternalError(ServerError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
    message = "Internal error."
