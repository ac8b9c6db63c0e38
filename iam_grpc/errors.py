"""The error tree. Core code raises these; each carries a transport-neutral
:class:`ErrorCode` and an ``ErrorInfo`` reason. Only the error-mapping
interceptor (``iam_grpc.interceptors.errors``) turns them into gRPC statuses:
the gRPC status code of the same name, with ``google.rpc.Status`` details
holding an ``ErrorInfo`` in domain ``iam.v1``.

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
    │   ├── TotpAlreadyEnabled      FAILED_PRECONDITION  TOTP_ALREADY_ENABLED
    │   ├── CallerUnknown           UNAUTHENTICATED      CALLER_UNKNOWN
    │   ├── CallerForbidden         PERMISSION_DENIED    CALLER_UNKNOWN
    │   ├── IdTokenInvalid          UNAUTHENTICATED      ID_TOKEN_INVALID
    │   ├── AccountLinkRequired     FAILED_PRECONDITION  ACCOUNT_LINK_REQUIRED
    │   ├── IdentityTaken           ALREADY_EXISTS       IDENTITY_TAKEN
    │   ├── LastSignInMethod        FAILED_PRECONDITION  LAST_SIGN_IN_METHOD
    │   ├── UserNotFound            NOT_FOUND            USER_NOT_FOUND (admin RPCs only)
    │   ├── TokenLimit              FAILED_PRECONDITION  TOKEN_LIMIT
    │   ├── ScopeRequired           PERMISSION_DENIED    SCOPE_REQUIRED (metadata missing)
    │   ├── IpNotAllowed            PERMISSION_DENIED    IP_NOT_ALLOWED
    │   ├── CursorExpired           OUT_OF_RANGE         CURSOR_EXPIRED
    │   └── NotImplementedYet       UNIMPLEMENTED        UNIMPLEMENTED (declared, not served yet)
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

import enum
from dataclasses import dataclass
from datetime import timedelta

__all__ = [
    "DOMAIN",
    "AccountLinkRequired",
    "AnomalyBlocked",
    "BackendUnavailable",
    "CallerForbidden",
    "CallerUnknown",
    "ChallengeExpired",
    "ClientError",
    "CodeInvalid",
    "CursorExpired",
    "DeadlineExceeded",
    "EmailDomainRejected",
    "EmailTaken",
    "ErrorCode",
    "FieldViolation",
    "IamError",
    "IdTokenInvalid",
    "IdentityTaken",
    "InternalError",
    "InvalidArgument",
    "InvalidCredentials",
    "IpNotAllowed",
    "LastSignInMethod",
    "LinkUsed",
    "NotImplementedYet",
    "PasswordBreached",
    "RateLimited",
    "ReauthRequired",
    "RefreshTokenReused",
    "RoleRequired",
    "ScopeRequired",
    "ServerError",
    "SessionExpired",
    "SessionRevoked",
    "TokenExpired",
    "TokenInvalid",
    "TokenLimit",
    "TotpAlreadyEnabled",
    "UserNotFound",
]

DOMAIN = "iam.v1"


class ErrorCode(enum.Enum):
    """The kind of failure, in transport-neutral terms. Each name is the gRPC status code the
    error interceptor answers with (and the HTTP mapping of a gateway follows from it)."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    UNIMPLEMENTED = "unimplemented"
    NOT_FOUND = "not_found"
    OUT_OF_RANGE = "out_of_range"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: ``field`` is a dotted path such as ``client.ip``."""

    field: str
    description: str


class IamError(Exception):
    """Base of every error the service answers with on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL
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
    code = ErrorCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"
    message = "The request has invalid fields."

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations)

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class InvalidCredentials(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "INVALID_CREDENTIALS"
    message = "Wrong email or password."


class EmailTaken(ClientError):
    code = ErrorCode.ALREADY_EXISTS
    reason = "EMAIL_TAKEN"
    message = "This email address is already registered."


class PasswordBreached(ClientError):
    code = ErrorCode.INVALID_ARGUMENT
    reason = "PASSWORD_BREACHED"
    message = "This password appears in known data breaches; choose another."


class EmailDomainRejected(ClientError):
    code = ErrorCode.INVALID_ARGUMENT
    reason = "EMAIL_DOMAIN_REJECTED"
    message = "This email domain cannot receive mail or is not accepted."


class TokenInvalid(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "TOKEN_INVALID"
    message = "The token is invalid."


class TokenExpired(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "TOKEN_EXPIRED"
    message = "The token has expired."


class SessionRevoked(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "SESSION_REVOKED"
    message = "The session has ended; sign in again."


class RefreshTokenReused(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "REFRESH_TOKEN_REUSED"
    message = "The refresh token was already used; the session has been ended."


class AnomalyBlocked(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "ANOMALY_BLOCKED"
    message = "The request was blocked as anomalous; sign in again."

    def __init__(self, check: str) -> None:
        super().__init__(metadata={"check": check})


class SessionExpired(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "SESSION_EXPIRED"
    message = "The session has expired; sign in again."

    def __init__(self, limit: str) -> None:
        super().__init__(metadata={"limit": limit})


class RateLimited(ClientError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"
    message = "Too many requests; retry later."

    def __init__(self, retry_after: timedelta, scope: str) -> None:
        super().__init__(metadata={"scope": scope})
        # At least one whole second, rounded up (behaviour.md 8.4).
        seconds = max(1, -int(-retry_after.total_seconds() // 1))
        self.retry_after = timedelta(seconds=seconds)


class CodeInvalid(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "CODE_INVALID"
    message = "The code is not correct."

    def __init__(self, attempts_left: int) -> None:
        super().__init__(metadata={"attempts_left": str(attempts_left)})


class ChallengeExpired(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "CHALLENGE_EXPIRED"
    message = "The challenge or link has expired or is no longer valid."


class LinkUsed(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "LINK_USED"
    message = "The link has already been used."


class RoleRequired(ClientError):
    code = ErrorCode.PERMISSION_DENIED
    reason = "ROLE_REQUIRED"
    message = "A required role is missing."

    def __init__(self, missing: list[str]) -> None:
        super().__init__(metadata={"missing": ",".join(sorted(missing))})


class ReauthRequired(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "REAUTH_REQUIRED"
    message = "This action needs a recent sign-in; complete a step-up challenge and retry."


class TotpAlreadyEnabled(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "TOTP_ALREADY_ENABLED"
    message = "An authenticator app is already set up; turn it off first."


class CallerUnknown(ClientError):
    code = ErrorCode.UNAUTHENTICATED
    reason = "CALLER_UNKNOWN"
    message = "The calling service is not authenticated."


class CallerForbidden(ClientError):
    code = ErrorCode.PERMISSION_DENIED
    reason = "CALLER_UNKNOWN"
    message = "The calling service may not call this method."


class UserNotFound(ClientError):
    """Only admin RPCs answer it: end-user RPCs never say whether an account exists."""

    code = ErrorCode.NOT_FOUND
    reason = "USER_NOT_FOUND"
    message = "No such user."


class TokenLimit(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "TOKEN_LIMIT"
    message = "Too many live API tokens; revoke one first."


class ScopeRequired(ClientError):
    code = ErrorCode.PERMISSION_DENIED
    reason = "SCOPE_REQUIRED"
    message = "A required scope is missing."

    def __init__(self, missing: list[str]) -> None:
        super().__init__(metadata={"missing": ",".join(sorted(missing))})


class IpNotAllowed(ClientError):
    code = ErrorCode.PERMISSION_DENIED
    reason = "IP_NOT_ALLOWED"
    message = "This token may not be used from this address."


class CursorExpired(ClientError):
    """An event cursor older than the retention (its events are gone), or one this stream never
    handed out: resume from now or from a newer cursor."""

    code = ErrorCode.OUT_OF_RANGE
    reason = "CURSOR_EXPIRED"
    message = "The cursor is older than the event retention."


class NotImplementedYet(ClientError):
    """An RPC the contract declares whose servicer has not landed (the generated base raises
    ``NotImplementedError``); the error interceptor answers it, never INTERNAL."""

    code = ErrorCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"
    message = "This method is not implemented yet."


class IdTokenInvalid(ClientError):
    """An ID token that does not verify for the named provider (unknown provider, signature,
    issuer, audience, expiry, nonce): one answer for all, so nothing tells which check failed."""

    code = ErrorCode.UNAUTHENTICATED
    reason = "ID_TOKEN_INVALID"
    message = "The ID token is not valid."


class AccountLinkRequired(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "ACCOUNT_LINK_REQUIRED"
    message = "Sign in another way, then link this identity."


class IdentityTaken(ClientError):
    code = ErrorCode.ALREADY_EXISTS
    reason = "IDENTITY_TAKEN"
    message = "This identity is linked to another account."


class LastSignInMethod(ClientError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = "LAST_SIGN_IN_METHOD"
    message = "This is the last way to sign in to the account; add another first."


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
    code = ErrorCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"
    message = "A backend is unavailable; retry later."


class DeadlineExceeded(ServerError):
    code = ErrorCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
    message = "The deadline expired before the operation could finish."


class InternalError(ServerError):
    code = ErrorCode.INTERNAL
    reason = "INTERNAL"
    message = "Internal error."
