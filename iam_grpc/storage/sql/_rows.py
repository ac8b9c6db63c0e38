"""Row <-> record conversion shared by the SQL stores."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from sqlalchemy.engine import Row

T = TypeVar("T")

__all__ = ["to_record", "to_values"]


def to_record(cls: type[T], row: Row[Any] | None) -> T | None:
    """Build a record from a row whose columns are the record's fields."""
    if row is None:
        return None
    return cls(**dict(row._mapping))


def to_values(record: Any, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """Column values of a record, leaving out ``without`` (e.g. a database-assigned id)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in without}
