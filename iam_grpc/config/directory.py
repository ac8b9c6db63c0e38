"""Settings of the second round's user directory and personal API tokens."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from iam_grpc.config.values import Duration, SettingsGroup

__all__ = ["ApiTokensSettings"]


class ApiTokensSettings(SettingsGroup):
    max_per_user: int = Field(default=20, ge=1, le=1000)
    max_ttl: Duration = timedelta(days=3650)
    last_used_flush: Duration = timedelta(seconds=30)
