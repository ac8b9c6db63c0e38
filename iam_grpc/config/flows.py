"""The sign-in flows: login, MFA challenges, emailed links, password reset, email change, step-up."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from iam_grpc.config.values import Duration, SettingsGroup


class LoginSettings(SettingsGroup):
    mfa_on_new_device: bool = True


class MfaSettings(SettingsGroup):
    code_length: int = Field(default=6, ge=6, le=8)
    ttl: Duration = timedelta(minutes=10)
    max_attempts: int = Field(default=5, ge=1, le=20)
    resend_interval: Duration = timedelta(seconds=60)
    max_resends: int = Field(default=3, ge=0, le=10)
    max_lifetime: Duration = timedelta(minutes=30)
    max_pending_per_user: int = Field(default=3, ge=1, le=20)
    # TOTP: the name authenticator apps show, time-steps of drift accepted either side of now,
    # and whether a user with TOTP may still complete challenges with the emailed code.
    totp_issuer: str = Field(default="iam-grpc", min_length=1, max_length=64)
    totp_window: int = Field(default=1, ge=0, le=2)
    email_with_totp: bool = True
    totp_max_auth_age: Duration = timedelta(minutes=15)


class LinkPaths(SettingsGroup):
    mfa: str = "/auth/mfa"
    step_up: str = "/auth/step-up"
    password_reset: str = "/auth/reset-password"  # noqa: S105 - a URL path, not a secret
    email_change: str = "/auth/confirm-email"
    verify_email: str = "/auth/verify-email"


class LinksSettings(SettingsGroup):
    base_url: str | None = None  # embedded default http://localhost:3000; required in production
    paths: LinkPaths = LinkPaths()
    password_reset_ttl: Duration = timedelta(minutes=20)
    email_change_ttl: Duration = timedelta(hours=1)
    verify_email_ttl: Duration = timedelta(hours=24)

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError("must be an http(s) URL without query or fragment")
        return value.rstrip("/")


class ResetSettings(SettingsGroup):
    response_floor: Duration = timedelta(milliseconds=500)
    untrust_devices: bool = False


class EmailChangeSettings(SettingsGroup):
    max_auth_age: Duration = timedelta(minutes=15)


class StepUpSettings(SettingsGroup):
    grant_ttl: Duration = timedelta(minutes=5)
    actions: list[str] = []


class EmailVerificationSettings(SettingsGroup):
    """``on_signup``: Signup mails a ``verify_email`` link. ``required``: no session before the
    address is verified (Signup answers no Session; Login answers an email challenge, whose
    code or link proves the address)."""

    on_signup: bool = False
    required: bool = False
