"""Column types shared by SQLite and MySQL/MariaDB (behaviour.md 10)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, LargeBinary, String
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["Blob", "Json", "Key", "LongId", "UtcDateTime", "ascii_str", "text_bin"]

_MYSQL = ("mysql", "mariadb")


class UtcDateTime(TypeDecorator[datetime]):
    """``DATETIME(6)`` on MySQL, ISO text on SQLite; accepts and returns aware UTC only."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in _MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: store timezone-aware UTC values")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def ascii_str(length: int, fixed: bool = False) -> TypeEngine[str]:
    """Identifiers and keyed hashes: ASCII with a binary collation, compared exactly."""
    base: TypeEngine[str] = String(length)
    variant = (
        mysql.CHAR(length, charset="ascii", collation="ascii_bin")
        if fixed
        else mysql.VARCHAR(length, charset="ascii", collation="ascii_bin")
    )
    return base.with_variant(variant, *_MYSQL)


def text_bin(length: int) -> TypeEngine[str]:
    """Unicode text compared byte-for-byte (``email_norm``: we normalise, the database must not)."""
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


def Key(length: int = 26) -> TypeEngine[str]:
    return ascii_str(length, fixed=True)


LongId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
Json: TypeEngine[Any] = JSON().with_variant(mysql.JSON(), *_MYSQL)
Blob: TypeEngine[bytes] = LargeBinary().with_variant(mysql.BLOB(), *_MYSQL)
