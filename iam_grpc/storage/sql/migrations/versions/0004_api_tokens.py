"""Personal API tokens (api.md, ApiTokenService).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Only a keyed hash of each secret is stored (``secret_hash``, HMAC under a sub-key of the master
key, with the master key's version in ``key_version``). Revoked and rotated-away secrets are
refused by their row (``revoked_at``, or a hash that no longer matches) and, until every cached
verification has expired, by a ``pat`` deny-list entry. Self-contained like the baseline.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
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


def _key(length: int) -> sa.types.TypeEngine[Any]:
    return sa.String(length).with_variant(mysql.CHAR(length, charset="ascii", collation="ascii_bin"), *_MY)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(mysql.JSON(), *_MY)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", _key(26), nullable=False),
        sa.Column("user_id", _key(26), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", _ascii(16), nullable=False),
        sa.Column("secret_hash", _key(43), nullable=False),
        sa.Column("key_version", sa.SmallInteger(), nullable=False),
        sa.Column("scopes", _json(), nullable=False),
        sa.Column("allowed_cidrs", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.Column("rotated_at", _ts(), nullable=True),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("revoke_reason", _ascii(32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_api_tokens_user_id_users", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("secret_hash", name="uq_api_tokens_secret_hash"),
        **_TABLE,
    )
    op.create_index("ix_api_tokens_user_id_revoked_at", "api_tokens", ["user_id", "revoked_at"])


def downgrade() -> None:
    op.drop_table("api_tokens")
