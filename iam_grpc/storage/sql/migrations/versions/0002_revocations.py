"""Revocations: single access tokens and signing keys withdrawn, recorded in SQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14

SQL is the authority for every revocation; Redis (or process memory) only caches
it, and is rebuilt from here when it may have lost data. Sessions keep theirs in
``sessions.revoked_at``; this table holds what had no row of its own (``jti``)
and key withdrawals (``kid``). Self-contained like the baseline.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
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


def _ascii(length: int) -> sa.types.TypeEngine[Any]:
    return sa.String(length).with_variant(mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), *_MY)


def upgrade() -> None:
    op.create_table(
        "revocations",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("kind", _ascii(8), nullable=False),
        sa.Column("value", _ascii(64), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "value", name="uq_revocations_kind_value"),
        **_TABLE,
    )
    op.create_index("ix_revocations_expires_at", "revocations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("revocations")
