"""Outgoing mail: the sender, templates, the outbox and SMTP."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from iam_grpc.config.values import Duration, SettingsGroup


class SmtpSettings(SettingsGroup):
    host: str = ""  # empty: write .eml files to mail.outbox_dir
    port: int = Field(default=587, ge=1, le=65535)
    # STARTTLS on a plain connection: required (refuse to send without it), when_offered, or off
    starttls: Literal["required", "when_offered", "off"] = "required"
    tls: bool = False  # implicit TLS (smtps, usually port 465)
    verify_certificate: bool = True
    username: str = ""
    password: SecretStr | None = None
    timeout: Duration = timedelta(seconds=10)


class MailSettings(SettingsGroup):
    from_address: str = "no-reply@localhost"
    from_name: str = "IAM"
    site_name: str = "IAM"
    support_url: str = ""
    default_locale: str = "en"
    templates_dir: Path | None = None
    outbox_dir: Path | None = None  # default: <data_dir>/outbox
    smtp: SmtpSettings = SmtpSettings()
    batch: int = Field(default=20, ge=1, le=1000)
    poll_interval: Duration = timedelta(seconds=2)
    retry_backoff: list[Duration] = [timedelta(seconds=s) for s in (30, 60, 120, 300, 600, 1800, 3600, 7200)]
    max_attempts: int = Field(default=8, ge=1, le=50)
    max_per_minute: int = Field(default=600, ge=1)
