"""Baseline schema (behaviour.md section 10).

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Self-contained on purpose: the column types are spelt out here instead of
imported from the package, so later changes to the code cannot change what
this revision creates.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
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
    kind = mysql.CHAR if fixed else mysql.VARCHAR
    return sa.String(length).with_variant(kind(length, charset="ascii", collation="ascii_bin"), *_MY)


def _key(length: int = 26) -> sa.types.TypeEngine[Any]:
    return _ascii(length, fixed=True)


def _bin_text(length: int) -> sa.types.TypeEngine[Any]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *_MY
    )


def _long_id() -> sa.types.TypeEngine[Any]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(mysql.JSON(), *_MY)


def _blob() -> sa.types.TypeEngine[Any]:
    return sa.LargeBinary().with_variant(mysql.BLOB(), *_MY)


def _index(table: str, *columns: str) -> None:
    op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns))


def _users() -> None:
    op.create_table(
        "users",
        sa.Column("id", _key(), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("email_norm", _bin_text(254), nullable=False),
        sa.Column("email_verified_at", _ts(), nullable=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("pepper_id", sa.SmallInteger(), nullable=False),
        sa.Column("credential_version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("password_changed_at", _ts(), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("last_name", sa.String(100), server_default=sa.text("''"), nullable=False),
        sa.Column("locale", sa.String(35), nullable=True),
        sa.Column("terms_accepted_at", _ts(), nullable=False),
        sa.Column("status", _ascii(16), server_default=sa.text("'active'"), nullable=False),
        sa.Column("disabled_at", _ts(), nullable=True),
        sa.Column("mfa_hold_until", _ts(), nullable=True),
        sa.Column("last_login_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email_norm", name="uq_users_email_norm"),
        **_TABLE,
    )
    _index("users", "status")


def _roles() -> None:
    op.create_table(
        "roles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", _ascii(64), nullable=False),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_roles_name"),
        **_TABLE,
    )


def _user_roles() -> None:
    op.create_table(
        "user_roles",
        sa.Column("user_id", _key(), nullable=False),
        sa.Column("role_id", sa.Integer(), nullable=False),
        sa.Column("granted_at", _ts(), nullable=False),
        sa.Column("granted_by", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_user_roles_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["role_id"], ["roles.id"], name="fk_user_roles_role_id_roles", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "role_id"),
        **_TABLE,
    )
    _index("user_roles", "role_id")


def _devices() -> None:
    op.create_table(
        "devices",
        sa.Column("id", _key(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("last_seen_at", _ts(), nullable=False),
        sa.Column("user_agent", sa.String(1024), nullable=True),
        sa.Column("browser_family", sa.String(64), nullable=True),
        sa.Column("browser_major", sa.String(16), nullable=True),
        sa.Column("os_family", sa.String(64), nullable=True),
        sa.Column("os_major", sa.String(16), nullable=True),
        sa.Column("device_brand", sa.String(64), nullable=True),
        sa.Column("device_model", sa.String(64), nullable=True),
        sa.Column("device_type", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        **_TABLE,
    )
    _index("devices", "last_seen_at")


def _user_devices() -> None:
    op.create_table(
        "user_devices",
        sa.Column("user_id", _key(), nullable=False),
        sa.Column("device_id", _key(), nullable=False),
        sa.Column("first_seen_at", _ts(), nullable=False),
        sa.Column("last_seen_at", _ts(), nullable=False),
        sa.Column("trusted_at", _ts(), nullable=True),
        sa.Column("trust_revoked_at", _ts(), nullable=True),
        sa.Column("baseline", _json(), nullable=False),
        sa.Column("known_networks", _json(), nullable=False),
        sa.Column("known_countries", _json(), nullable=False),
        sa.Column("last_ip", sa.String(45), nullable=True),
        sa.Column("last_lat", sa.Double(), nullable=True),
        sa.Column("last_lon", sa.Double(), nullable=True),
        sa.Column("last_accuracy_km", sa.Integer(), nullable=True),
        sa.Column("last_located_at", _ts(), nullable=True),
        sa.Column("proxy_allowed_until", _ts(), nullable=True),
        sa.Column("hosting_allowed_until", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_user_devices_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_user_devices_device_id_devices", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "device_id"),
        **_TABLE,
    )
    _index("user_devices", "device_id")
    _index("user_devices", "user_id", "last_seen_at")


def _sessions() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", _key(), nullable=False),
        sa.Column("user_id", _key(), nullable=False),
        sa.Column("device_id", _key(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("auth_at", _ts(), nullable=False),
        sa.Column("last_refreshed_at", _ts(), nullable=False),
        sa.Column("absolute_expires_at", _ts(), nullable=False),
        sa.Column("mfa_at", _ts(), nullable=True),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("revoke_reason", _ascii(32), nullable=True),
        sa.Column("created_ip", sa.String(45), nullable=False),
        sa.Column("last_ip", sa.String(45), nullable=False),
        sa.Column("last_country", _ascii(2, fixed=True), nullable=True),
        sa.Column("last_region", sa.String(128), nullable=True),
        sa.Column("last_city", sa.String(128), nullable=True),
        sa.Column("last_browser", sa.String(64), nullable=True),
        sa.Column("last_os", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_sessions_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name="fk_sessions_device_id_devices", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
        **_TABLE,
    )
    _index("sessions", "user_id", "revoked_at", "absolute_expires_at")
    _index("sessions", "device_id")
    _index("sessions", "absolute_expires_at")
    _index("sessions", "revoked_at")


def _refresh_tokens() -> None:
    op.create_table(
        "refresh_tokens",
        sa.Column("id", _long_id(), autoincrement=True, nullable=False),
        sa.Column("session_id", _key(), nullable=False),
        sa.Column("token_hash", _key(43), nullable=False),
        sa.Column("key_version", sa.SmallInteger(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", _ascii(8), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("used_at", _ts(), nullable=True),
        sa.Column("successor_id", _long_id(), nullable=True),
        sa.Column("access_jti", _key(22), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_refresh_tokens_session_id_sessions", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash", name="uq_refresh_tokens_token_hash"),
        **_TABLE,
    )
    _index("refresh_tokens", "session_id", "created_at")
    _index("refresh_tokens", "state", "expires_at")


def _signing_keys() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", _ascii(64), nullable=False),
        sa.Column("alg", _ascii(10), nullable=False),
        sa.Column("public_jwk", _json(), nullable=False),
        sa.Column("private_key_enc", _blob(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("publish_at", _ts(), nullable=False),
        sa.Column("activate_at", _ts(), nullable=False),
        sa.Column("deactivate_at", _ts(), nullable=True),
        sa.Column("unpublish_at", _ts(), nullable=True),
        sa.Column("destroyed_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("kid"),
        **_TABLE,
    )
    _index("signing_keys", "activate_at")


def _email_outbox() -> None:
    op.create_table(
        "email_outbox",
        sa.Column("id", _long_id(), autoincrement=True, nullable=False),
        sa.Column("kind", _ascii(40), nullable=False),
        sa.Column("recipient", sa.String(254), nullable=False),
        sa.Column("recipient_h", _key(43), nullable=False),
        sa.Column("user_id", _key(), nullable=True),
        sa.Column("locale", sa.String(35), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("sealed_params", _blob(), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("status", _ascii(12), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", _ts(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("not_after", _ts(), nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", _ts(), nullable=True),
        sa.Column("sent_at", _ts(), nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("provider_message_id", sa.String(255), nullable=True),
        sa.Column("dedupe_key", _ascii(96), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dedupe_key", name="uq_email_outbox_dedupe_key"),
        **_TABLE,
    )
    _index("email_outbox", "recipient_h", "created_at")
    _index("email_outbox", "status", "priority", "next_attempt_at")


def _audit_events() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", _long_id(), autoincrement=True, nullable=False),
        sa.Column("occurred_at", _ts(), nullable=False),
        sa.Column("type", _ascii(48), nullable=False),
        sa.Column("outcome", _ascii(16), nullable=False),
        sa.Column("user_id", _key(), nullable=True),
        sa.Column("session_id", _key(), nullable=True),
        sa.Column("device_id", _key(), nullable=True),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("caller", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("details", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        **_TABLE,
    )
    _index("audit_events", "occurred_at")
    _index("audit_events", "type", "occurred_at")
    _index("audit_events", "user_id", "occurred_at")


def upgrade() -> None:
    # Parents before the tables whose foreign keys name them.
    _users()
    _roles()
    _user_roles()
    _devices()
    _user_devices()
    _sessions()
    _refresh_tokens()
    _signing_keys()
    _email_outbox()
    _audit_events()


def downgrade() -> None:
    for table in (
        "audit_events",
        "email_outbox",
        "signing_keys",
        "refresh_tokens",
        "sessions",
        "user_devices",
        "devices",
        "user_roles",
        "roles",
        "users",
    ):
        op.drop_table(table)
