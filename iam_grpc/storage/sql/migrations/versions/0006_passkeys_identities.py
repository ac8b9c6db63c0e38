"""Passkeys (WebAuthn credentials) and identities linked from other OpenID Connect providers.

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-07

Self-contained like the baseline: the column types are spelled out here, not imported.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0006"
down_revision: str | None = "0005"
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


def _key(length: int = 26) -> sa.types.TypeEngine[Any]:
    return sa.String(length).with_variant(mysql.CHAR(length, charset="ascii", collation="ascii_bin"), *_MY)


def upgrade() -> None:
    op.create_table(
        "passkeys",
        sa.Column("id", _key(), nullable=False),
        sa.Column("user_id", _key(), nullable=False),
        sa.Column("credential_id", _ascii(1400), nullable=False),
        sa.Column("public_key", sa.LargeBinary().with_variant(mysql.BLOB(), *_MY), nullable=False),
        sa.Column("sign_count", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("transports", _ascii(200), server_default=sa.text("''"), nullable=False),
        sa.Column("aaguid", _ascii(36), server_default=sa.text("''"), nullable=False),
        sa.Column("backup_eligible", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("backed_up", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.Column("credential_hash", _key(43), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_passkeys_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("credential_hash", name="uq_passkeys_credential_hash"),
        **_TABLE,
    )
    op.create_index("ix_passkeys_user_id", "passkeys", ["user_id"])
    op.create_table(
        "identities",
        sa.Column("user_id", _key(), nullable=False),
        sa.Column("provider", _ascii(32), nullable=False),
        sa.Column("subject", _ascii(255), nullable=False),
        sa.Column("email", sa.String(254), server_default=sa.text("''"), nullable=False),
        sa.Column("linked_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_identities_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "provider"),
        sa.UniqueConstraint("provider", "subject", name="uq_identities_provider_subject"),
        **_TABLE,
    )


def downgrade() -> None:
    op.drop_table("identities")
    op.drop_table("passkeys")
