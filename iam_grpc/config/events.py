"""Events (api.md EventService): the stream's retention and polling, and the optional push
sinks (signed webhooks, NATS JetStream)."""

from __future__ import annotations

from datetime import timedelta
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from iam_grpc.config.values import Duration, MaskedUrl, SettingsGroup
from iam_grpc.push.signing import secret_key


class WebhookSettings(SettingsGroup):
    """Standard Webhooks delivery of every event to one endpoint (off while ``url`` is empty)."""

    url: MaskedUrl = ""
    # The signing secret, Standard Webhooks style: "whsec_" + base64 of at least 24 bytes (the
    # prefix is optional); the receiver verifies with the same secret.
    secret: SecretStr | None = None
    timeout: Duration = timedelta(seconds=5)
    max_attempts: int = Field(default=8, ge=1, le=50)
    backoff: Duration = timedelta(seconds=5)  # before the second attempt; doubles each time
    backoff_max: Duration = timedelta(hours=1)
    batch: int = Field(default=50, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            secret_key(value.get_secret_value())  # raises ValueError with a message, never the value
        return value

    @model_validator(mode="after")
    def _secret_with_url(self) -> Self:
        if self.url and (self.secret is None or not self.secret.get_secret_value()):
            raise ValueError("events.webhook.secret is required with events.webhook.url")
        return self


class NatsSettings(SettingsGroup):
    """Publishing every event to JetStream subjects ``<subject_prefix>.<kind>`` (off while
    ``url`` is empty; IAM_NATS_URL)."""

    url: MaskedUrl = ""
    subject_prefix: str = Field(default="iam.events", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    # Created (subjects "<subject_prefix>.>") when missing; empty: the operator manages the stream.
    stream: str = Field(default="iam-events", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    timeout: Duration = timedelta(seconds=5)


class EventsSettings(SettingsGroup):
    retention: Duration = timedelta(days=7)  # a cursor older than this answers CURSOR_EXPIRED
    poll_interval: Duration = timedelta(milliseconds=250)  # how often each replica looks for new events
    watcher_buffer: int = Field(default=1000, ge=10)  # events held per watcher before it re-reads SQL
    webhook: WebhookSettings = WebhookSettings()
    nats: NatsSettings = NatsSettings()

    @field_validator("poll_interval")
    @classmethod
    def _poll(cls, value: timedelta) -> timedelta:
        if value < timedelta(milliseconds=10):
            raise ValueError("must be at least 10ms")
        return value
