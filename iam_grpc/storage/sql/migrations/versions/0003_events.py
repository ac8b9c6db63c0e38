"""Events: the outbox of what changed, its cursor marks and push deliveries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

``events`` rows are written in the transaction of the change they describe and
numbered (``seq``, the stream cursor) after commit by the sequencer;
``event_marks`` holds named positions (last seq handed out, purged-through,
one per push sink); ``event_deliveries`` the webhook deliveries with their
retries and dead letters. Self-contained like the baseline.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_MY = ("mysql", "mariadb")
_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}


def _ts() -> sa.types.TypeEngine[Any]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MY)


def _ascii(length: int, fixed: bool = False) -> sa.types.TypeEngine[Any]:
    variant = (
        mysql.CHAR(length, charset="ascii", collation="ascii_bin")
        if fixed
        else mysql.VARCHAR(length, charset="ascii", collation="ascii_bin")
    )
    return sa.String(length).with_variant(variant, *_MY)


def _long() -> sa.types.TypeEngine[Any]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("pos", _long(), autoincrement=True, nullable=False),
        sa.Column("seq", _long(), nullable=True),
        sa.Column("id", _ascii(26, fixed=True), nullable=False),
        sa.Column("kind", _ascii(48), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("user_id", _ascii(26, fixed=True), nullable=True),
        sa.Column("session_id", _ascii(26, fixed=True), nullable=True),
        sa.Column("data", sa.JSON().with_variant(mysql.JSON(), *_MY), nullable=False),
        sa.PrimaryKeyConstraint("pos"),
        sa.UniqueConstraint("seq", name="uq_events_seq"),
        sa.UniqueConstraint("id", name="uq_events_id"),
        **_TABLE,
    )
    op.create_index("ix_events_at", "events", ["at"])
    marks = op.create_table(
        "event_marks",
        sa.Column("name", _ascii(32), nullable=False),
        sa.Column("value", _long(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        **_TABLE,
    )
    op.bulk_insert(marks, [{"name": "sequence", "value": 0}, {"name": "purged", "value": 0}])
    op.create_table(
        "event_deliveries",
        sa.Column("id", _long(), autoincrement=True, nullable=False),
        sa.Column("sink", _ascii(16), nullable=False),
        sa.Column("seq", _long(), nullable=False),
        sa.Column("event_id", _ascii(26, fixed=True), nullable=False),
        sa.Column("status", _ascii(12), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", _ts(), nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("delivered_at", _ts(), nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sink", "seq", name="uq_event_deliveries_sink_seq"),
        **_TABLE,
    )
    op.create_index(
        "ix_event_deliveries_status_next_attempt_at", "event_deliveries", ["status", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_table("event_deliveries")
    op.drop_table("event_marks")
    op.drop_table("events")
