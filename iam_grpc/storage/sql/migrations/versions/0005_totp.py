"""TOTP factors and their recovery codes.

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-07

``totp_factors`` holds one enabled factor per user: the secret sealed under the
master key (never in clear), and the newest time-step a code was accepted for
(single use across replicas). ``totp_recovery_codes`` holds keyed hashes of the
recovery codes, each spent once. Self-contained like the baseline.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
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


def upgrade() -> None:
    op.create_table(
        "totp_factors",
        sa.Column("user_id", _ascii(26, fixed=True), nullable=False),
        sa.Column("secret_enc", sa.LargeBinary().with_variant(mysql.BLOB(), *_MY), nullable=False),
        sa.Column("enabled_at", _ts(), nullable=False),
        sa.Column("last_step", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_totp_factors_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id"),
        **_TABLE,
    )
    op.create_table(
        "totp_recovery_codes",
        sa.Column("code_hash", _ascii(64), nullable=False),
        sa.Column("user_id", _ascii(26, fixed=True), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("used_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_totp_recovery_codes_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("code_hash"),
        **_TABLE,
    )
    op.create_index("ix_totp_recovery_codes_user_id", "totp_recovery_codes", ["user_id"])


def downgrade() -> None:
    op.drop_table("totp_recovery_codes")
    op.drop_table("totp_factors")
