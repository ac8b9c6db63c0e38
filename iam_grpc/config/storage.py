"""Storage settings: the SQL database, Redis and the in-process ephemeral store."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, field_validator

from iam_grpc.config.values import Duration, MaskedUrl, SettingsGroup


class DatabaseSettings(SettingsGroup):
    url: MaskedUrl = ""  # default: sqlite+aiosqlite:///<data_dir>/iam.db
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_recycle: Duration = timedelta(seconds=1800)
    pool_pre_ping: bool = True
    # With MariaDB down or stalled a call fails within these (docs/deployment.md, "Losing a
    # dependency"): a new connection, and each wait for the server's answer or a pooled connection.
    connect_timeout: Duration = timedelta(seconds=2)
    statement_timeout: Duration = timedelta(seconds=2)
    startup_wait: Duration = timedelta(seconds=60)
    auto_migrate: bool | None = None  # default: true in embedded mode, false in production

    @field_validator("url")
    @classmethod
    def _driver(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "mysql+asyncmy://", "mysql+aiomysql://")):
            raise ValueError("must start with sqlite+aiosqlite://, mysql+asyncmy:// or mysql+aiomysql://")
        if value:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                parsed = make_url(value)
                _ = parsed.port  # parses the port
            except (ArgumentError, ValueError):
                raise ValueError("is not a valid URL (scheme://user:password@host:port/database)") from None
            if parsed.get_backend_name() == "mysql" and not (parsed.host and parsed.database):
                raise ValueError("a MySQL URL needs a host and a database name")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class RedisSettings(SettingsGroup):
    url: MaskedUrl = ""  # empty: in-process ephemeral store
    key_prefix: str = Field(default="iam:", min_length=1, max_length=64)
    socket_timeout: Duration = timedelta(milliseconds=250)
    connect_timeout: Duration = timedelta(seconds=1)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        """One server, Sentinel or Cluster (iam_grpc.storage.redis_topology parses all three)."""
        if value:
            from iam_grpc.storage.redis_topology import parse_redis_url  # redis-py only when set

            parse_redis_url(value)
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        """A brace in the prefix would make it a hash tag: every key in one Redis Cluster slot."""
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or }")
        return value


class EphemeralSettings(SettingsGroup):
    memory_max_keys: int = Field(default=200_000, ge=1000)
