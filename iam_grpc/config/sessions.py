"""Tokens, signing keys, refresh rotation, sessions, devices and roles."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, Self

from pydantic import Field, model_validator

from iam_grpc.config.values import Duration, SettingsGroup


class TokensSettings(SettingsGroup):
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    issuer: str = Field(default="iam-grpc", min_length=1)
    audience: str = Field(default="iam-grpc", min_length=1)
    access_ttl: Duration = timedelta(seconds=900)
    leeway: Duration = timedelta(seconds=30)
    denylist_fallback: Literal["sql", "closed"] = "sql"
    denylist_replay: Duration = timedelta(seconds=60)
    # Each worker's in-memory copy of the deny-lists (with Redis): how old it may be before
    # checks read per call (0: no copy), and what they do then. A revoking call answers only
    # after this bound, so that no worker accepts the token once it has answered.
    denylist_staleness: Duration = timedelta(seconds=1)
    denylist_stale: Literal["per_call", "refuse"] = "per_call"


class KeysSettings(SettingsGroup):
    rotation_interval: Duration = timedelta(days=30)  # 0: manual rotation only
    publish_ahead: Duration = timedelta(hours=1)
    jwks_max_age: Duration = timedelta(seconds=300)
    reload_interval: Duration = timedelta(seconds=60)

    @model_validator(mode="after")
    def _ahead(self) -> Self:
        if self.publish_ahead <= self.jwks_max_age:
            raise ValueError("keys.publish_ahead must be longer than keys.jwks_max_age")
        return self


class RefreshSettings(SettingsGroup):
    absolute_ttl: Duration = timedelta(days=30)
    idle_ttl: Duration = timedelta(days=7)
    grace: Duration = timedelta(seconds=15)
    reuse_memory: Duration = timedelta(days=7)
    reuse_mfa_hold: Duration = timedelta(days=7)


class SessionsSettings(SettingsGroup):
    max_per_user: int = Field(default=10, ge=1, le=1000)


class DevicesSettings(SettingsGroup):
    trust_idle: Duration = timedelta(days=90)
    max_networks: int = Field(default=8, ge=1, le=64)
    network_memory: Duration = timedelta(days=90)
    max_countries: int = Field(default=5, ge=1, le=64)


class RolesSettings(SettingsGroup):
    default: list[str] = ["user"]
