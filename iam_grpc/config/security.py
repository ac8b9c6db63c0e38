"""Secret material and passwords: the master keys, argon2id cost and peppers, the breached-password check."""

from __future__ import annotations

import base64
import binascii
import os
from datetime import timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator

from iam_grpc.config.values import Duration, SettingsGroup


class SecretsSettings(SettingsGroup):
    master_key: SecretStr | None = None  # base64, at least 32 bytes; generated in embedded mode
    previous_master_keys: list[SecretStr] = []

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_key_material(value.get_secret_value())
        return value

    @field_validator("previous_master_keys")
    @classmethod
    def _previous(cls, value: list[SecretStr]) -> list[SecretStr]:
        for item in value:
            _check_key_material(item.get_secret_value())
        return value


def _check_key_material(text: str) -> None:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 text") from None
    if len(raw) < 32:
        raise ValueError("must decode to at least 32 bytes (generate one with `iam-grpc secrets generate`)")


ARGON2_FLOOR = {"memory_kib": 19456, "time_cost": 2, "parallelism": 1}


class PasswordsSettings(SettingsGroup):
    memory_kib: int = Field(default=19456, ge=ARGON2_FLOOR["memory_kib"], le=4 * 1024 * 1024)
    time_cost: int = Field(default=2, ge=ARGON2_FLOOR["time_cost"], le=100)
    parallelism: int = Field(default=1, ge=ARGON2_FLOOR["parallelism"], le=64)
    hash_len: int = Field(default=32, ge=16, le=64)
    salt_len: int = Field(default=16, ge=16, le=64)
    peppers: dict[int, SecretStr] = {}
    current_pepper: int | None = None
    min_length: int = Field(default=12, ge=8, le=128)
    max_length: int = Field(default=128, ge=64, le=1024)
    max_concurrent_hashes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    max_queued_hashes: int = Field(default=64, ge=0)
    common_list: Path | None = None  # None: the bundled list

    @field_validator("peppers")
    @classmethod
    def _peppers(cls, value: dict[int, SecretStr]) -> dict[int, SecretStr]:
        for pepper_id, secret in value.items():
            if not 1 <= pepper_id <= 32767:
                raise ValueError("pepper ids must be between 1 and 32767")
            if len(secret.get_secret_value().encode()) < 16:
                raise ValueError("each pepper must be at least 16 bytes")
        return value

    @model_validator(mode="after")
    def _current(self) -> Self:
        if self.current_pepper is not None and self.current_pepper not in self.peppers:
            raise ValueError("passwords.current_pepper must name an entry of passwords.peppers")
        if self.peppers and self.current_pepper is None:
            raise ValueError("passwords.current_pepper is required when passwords.peppers is set")
        if self.max_length < self.min_length:
            raise ValueError("passwords.max_length must not be below passwords.min_length")
        return self


class HibpSettings(SettingsGroup):
    mode: Literal["off", "online", "offline"] | None = None  # default: off embedded, online production
    url: str = "https://api.pwnedpasswords.com/range/"
    file: Path | None = None  # offline mode: sorted SHA-1:count file
    timeout: Duration = timedelta(seconds=1)
    fail_open: bool = True
    cache_ttl: Duration = timedelta(hours=24)
