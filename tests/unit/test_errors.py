"""Error mapping: each IamError becomes its status code with ErrorInfo and the right extra details."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2

from iam_grpc import errors
from iam_grpc.interceptors.errors import to_status

CONTRACT = [
    (
        errors.InvalidArgument([errors.FieldViolation("email", "bad")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (errors.InvalidCredentials(), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"),
    (errors.EmailTaken(), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN"),
    (errors.PasswordBreached(), grpc.StatusCode.INVALID_ARGUMENT, "PASSWORD_BREACHED"),
    (errors.EmailDomainRejected(), grpc.StatusCode.INVALID_ARGUMENT, "EMAIL_DOMAIN_REJECTED"),
    (errors.TokenInvalid(), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
    (errors.TokenExpired(), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
    (errors.SessionRevoked(), grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED"),
    (errors.RefreshTokenReused(), grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED"),
    (errors.AnomalyBlocked("rotation_burst"), grpc.StatusCode.UNAUTHENTICATED, "ANOMALY_BLOCKED"),
    (errors.SessionExpired("absolute"), grpc.StatusCode.UNAUTHENTICATED, "SESSION_EXPIRED"),
    (errors.RateLimited(timedelta(seconds=1), "ip"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    (errors.CodeInvalid(3), grpc.StatusCode.UNAUTHENTICATED, "CODE_INVALID"),
    (errors.ChallengeExpired(), grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED"),
    (errors.LinkUsed(), grpc.StatusCode.FAILED_PRECONDITION, "LINK_USED"),
    (errors.RoleRequired(["b", "a"]), grpc.StatusCode.PERMISSION_DENIED, "ROLE_REQUIRED"),
    (errors.ReauthRequired(), grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED"),
    (errors.CallerUnknown(), grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN"),
    (errors.CallerForbidden(), grpc.StatusCode.PERMISSION_DENIED, "CALLER_UNKNOWN"),
    (errors.UserNotFound(), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"),
    (errors.TokenLimit(), grpc.StatusCode.FAILED_PRECONDITION, "TOKEN_LIMIT"),
    (errors.ScopeRequired(["read"]), grpc.StatusCode.PERMISSION_DENIED, "SCOPE_REQUIRED"),
    (errors.IpNotAllowed(), grpc.StatusCode.PERMISSION_DENIED, "IP_NOT_ALLOWED"),
    (errors.BackendUnavailable(), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
    (errors.InternalError(), grpc.StatusCode.INTERNAL, "INTERNAL"),
]


def info_of(error: errors.IamError) -> error_details_pb2.ErrorInfo:
    status = to_status(error, "req-00000001")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.mark.parametrize(
    ("error", "code", "reason"), CONTRACT, ids=[c[2] + "-" + c[1].name for c in CONTRACT]
)
def test_each_error_maps_to_the_api_md_code_and_reason(
    error: errors.IamError, code: grpc.StatusCode, reason: str
) -> None:
    """The api.md error table, row by row."""
    status = to_status(error)
    assert status.code == code.value[0]
    info = info_of(error)
    assert (info.reason, info.domain) == (reason, "iam.v1")


def test_error_metadata_carries_the_documented_keys() -> None:
    """check, limit, scope, attempts_left and missing travel in ErrorInfo.metadata."""
    assert dict(info_of(errors.AnomalyBlocked("device")).metadata) == {"check": "device"}
    assert dict(info_of(errors.SessionExpired("idle")).metadata) == {"limit": "idle"}
    assert dict(info_of(errors.RateLimited(timedelta(seconds=3), "email")).metadata) == {"scope": "email"}
    assert dict(info_of(errors.CodeInvalid(0)).metadata) == {"attempts_left": "0"}
    assert dict(info_of(errors.RoleRequired(["writer", "admin"])).metadata) == {"missing": "admin,writer"}


def test_field_violations_travel_as_bad_request() -> None:
    """Every violation of a request is reported together."""
    error = errors.InvalidArgument(
        [errors.FieldViolation("email", "too long"), errors.FieldViolation("client.ip", "not an IP")]
    )
    status = to_status(error)
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("email", "too long"),
        ("client.ip", "not an IP"),
    ]


@pytest.mark.parametrize(
    ("wait", "seconds"),
    [
        (timedelta(0), 1),
        (timedelta(milliseconds=1), 1),
        (timedelta(seconds=1.2), 2),
        (timedelta(seconds=59), 59),
    ],
)
def test_retry_info_is_whole_seconds_rounded_up_and_at_least_one(wait: timedelta, seconds: int) -> None:
    """RetryInfo.retry_delay is the wait rounded up to whole seconds, never below 1 s."""
    status = to_status(errors.RateLimited(wait, "ip"))
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=seconds)


def test_internal_errors_show_only_the_request_id() -> None:
    """INTERNAL says nothing but the request id."""
    assert (
        to_status(errors.InternalError(), "req-12345678").message
        == "Internal error (request id req-12345678)."
    )


def test_credential_failures_carry_nothing_of_the_call() -> None:
    """INVALID_CREDENTIALS is the same bytes for every call (whatever its request id): only its
    ErrorInfo, without metadata, and a message that names no account; unlike INTERNAL, which shows
    the request id. (That the login flow answers every credential failure with it is S1, checked
    through the server in tests/integration/test_login_security.py.)"""
    one, other = (to_status(errors.InvalidCredentials(), rid) for rid in ("req-aaaaaaaa", "req-bbbbbbbb"))
    assert one.SerializeToString() == other.SerializeToString()
    info = error_details_pb2.ErrorInfo()
    assert [detail.Unpack(info) for detail in one.details] == [True]
    assert (info.reason, dict(info.metadata)) == ("INVALID_CREDENTIALS", {})
    assert "req-" not in one.message
    assert "exist" not in one.message.lower()
    internal = (to_status(errors.InternalError(), rid) for rid in ("req-aaaaaaaa", "req-bbbbbbbb"))
    assert len({status.SerializeToString() for status in internal}) == 2
