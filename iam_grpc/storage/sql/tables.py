"""SQLAlchemy Core tables: the whole schema of behaviour.md section 10.

One definition for MySQL 8 / MariaDB 10.11 (InnoDB, utf8mb4) and SQLite.
No column has a database-side time default: every time comes from the
injected clock. Constraint names follow one naming convention so migrations
can address them on every engine.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    text,
)

from iam_grpc.storage.sql.types import Blob, Json, Key, LongId, UtcDateTime, ascii_str, text_bin

__all__ = [
    "api_tokens",
    "audit_events",
    "devices",
    "email_outbox",
    "event_deliveries",
    "event_marks",
    "events",
    "identities",
    "metadata",
    "passkeys",
    "refresh_tokens",
    "revocations",
    "roles",
    "sessions",
    "signing_keys",
    "totp_factors",
    "totp_recovery_codes",
    "user_devices",
    "user_roles",
    "users",
]

# Primary keys stay unnamed: MySQL calls every one PRIMARY.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

_MYSQL_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_unicode_ci",
}

users = Table(
    "users",
    metadata,
    Column("id", Key(26), primary_key=True),
    Column("email", String(254), nullable=False),
    Column("email_norm", text_bin(254), nullable=False),
    Column("email_verified_at", UtcDateTime(), nullable=True),
    Column("password_hash", String(255), nullable=True),
    Column("pepper_id", SmallInteger(), nullable=False),
    Column("credential_version", Integer(), nullable=False, server_default=text("1")),
    Column("password_changed_at", UtcDateTime(), nullable=True),
    Column("name", String(100), nullable=False),
    Column("last_name", String(100), nullable=False, server_default=text("''")),
    Column("locale", String(35), nullable=True),
    Column("terms_accepted_at", UtcDateTime(), nullable=False),
    Column("status", ascii_str(16), nullable=False, server_default=text("'active'")),
    Column("disabled_at", UtcDateTime(), nullable=True),
    Column("mfa_hold_until", UtcDateTime(), nullable=True),
    Column("last_login_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    UniqueConstraint("email_norm"),
    Index(None, "status"),
    **_MYSQL_TABLE,
)

roles = Table(
    "roles",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("name", ascii_str(64), nullable=False),
    Column("description", String(255), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    UniqueConstraint("name"),
    **_MYSQL_TABLE,
)

user_roles = Table(
    "user_roles",
    metadata,
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("role_id", Integer(), ForeignKey("roles.id", ondelete="CASCADE"), nullable=False),
    Column("granted_at", UtcDateTime(), nullable=False),
    Column("granted_by", String(64), nullable=False),
    PrimaryKeyConstraint("user_id", "role_id"),
    Index(None, "role_id"),
    **_MYSQL_TABLE,
)

devices = Table(
    "devices",
    metadata,
    Column("id", Key(26), primary_key=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("last_seen_at", UtcDateTime(), nullable=False),
    Column("user_agent", String(1024), nullable=True),
    Column("browser_family", String(64), nullable=True),
    Column("browser_major", String(16), nullable=True),
    Column("os_family", String(64), nullable=True),
    Column("os_major", String(16), nullable=True),
    Column("device_brand", String(64), nullable=True),
    Column("device_model", String(64), nullable=True),
    Column("device_type", String(16), nullable=True),
    Index(None, "last_seen_at"),
    **_MYSQL_TABLE,
)

user_devices = Table(
    "user_devices",
    metadata,
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("device_id", Key(26), ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("first_seen_at", UtcDateTime(), nullable=False),
    Column("last_seen_at", UtcDateTime(), nullable=False),
    Column("trusted_at", UtcDateTime(), nullable=True),
    Column("trust_revoked_at", UtcDateTime(), nullable=True),
    Column("baseline", Json, nullable=False),
    Column("known_networks", Json, nullable=False),
    Column("known_countries", Json, nullable=False),
    Column("last_ip", String(45), nullable=True),
    Column("last_lat", Double(), nullable=True),
    Column("last_lon", Double(), nullable=True),
    Column("last_accuracy_km", Integer(), nullable=True),
    Column("last_located_at", UtcDateTime(), nullable=True),
    Column("proxy_allowed_until", UtcDateTime(), nullable=True),
    Column("hosting_allowed_until", UtcDateTime(), nullable=True),
    PrimaryKeyConstraint("user_id", "device_id"),
    Index(None, "device_id"),
    Index(None, "user_id", "last_seen_at"),
    **_MYSQL_TABLE,
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Key(26), primary_key=True),
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("device_id", Key(26), ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("auth_at", UtcDateTime(), nullable=False),
    Column("last_refreshed_at", UtcDateTime(), nullable=False),
    Column("absolute_expires_at", UtcDateTime(), nullable=False),
    Column("mfa_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column("revoke_reason", ascii_str(32), nullable=True),
    Column("created_ip", String(45), nullable=False),
    Column("last_ip", String(45), nullable=False),
    Column("last_country", ascii_str(2, fixed=True), nullable=True),
    Column("last_region", String(128), nullable=True),
    Column("last_city", String(128), nullable=True),
    Column("last_browser", String(64), nullable=True),
    Column("last_os", String(64), nullable=True),
    Index(None, "user_id", "revoked_at", "absolute_expires_at"),
    Index(None, "device_id"),
    Index(None, "absolute_expires_at"),
    Index(None, "revoked_at"),
    **_MYSQL_TABLE,
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", LongId, primary_key=True, autoincrement=True),
    Column("session_id", Key(26), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", Key(43), nullable=False),
    Column("key_version", SmallInteger(), nullable=False),
    Column("generation", Integer(), nullable=False),
    Column("state", ascii_str(8), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("used_at", UtcDateTime(), nullable=True),
    Column("successor_id", LongId, nullable=True),
    Column("access_jti", Key(22), nullable=False),
    UniqueConstraint("token_hash"),
    Index(None, "session_id", "created_at"),
    Index(None, "state", "expires_at"),
    **_MYSQL_TABLE,
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", ascii_str(64), primary_key=True),
    Column("alg", ascii_str(10), nullable=False),
    Column("public_jwk", Json, nullable=False),
    Column("private_key_enc", Blob, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("publish_at", UtcDateTime(), nullable=False),
    Column("activate_at", UtcDateTime(), nullable=False),
    Column("deactivate_at", UtcDateTime(), nullable=True),
    Column("unpublish_at", UtcDateTime(), nullable=True),
    Column("destroyed_at", UtcDateTime(), nullable=True),
    Index(None, "activate_at"),
    **_MYSQL_TABLE,
)

email_outbox = Table(
    "email_outbox",
    metadata,
    Column("id", LongId, primary_key=True, autoincrement=True),
    Column("kind", ascii_str(40), nullable=False),
    Column("recipient", String(254), nullable=False),
    Column("recipient_h", Key(43), nullable=False),
    Column("user_id", Key(26), nullable=True),
    Column("locale", String(35), nullable=False),
    Column("params", Json, nullable=False),
    Column("sealed_params", Blob, nullable=True),
    Column("priority", SmallInteger(), nullable=False),
    Column("status", ascii_str(12), nullable=False),
    Column("attempts", SmallInteger(), nullable=False, server_default=text("0")),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("not_after", UtcDateTime(), nullable=False),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UtcDateTime(), nullable=True),
    Column("sent_at", UtcDateTime(), nullable=True),
    Column("last_error", String(255), nullable=True),
    Column("provider_message_id", String(255), nullable=True),
    Column("dedupe_key", ascii_str(96), nullable=True),
    UniqueConstraint("dedupe_key"),
    Index(None, "recipient_h", "created_at"),
    Index(None, "status", "priority", "next_attempt_at"),
    **_MYSQL_TABLE,
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", LongId, primary_key=True, autoincrement=True),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("type", ascii_str(48), nullable=False),
    Column("outcome", ascii_str(16), nullable=False),
    Column("user_id", Key(26), nullable=True),
    Column("session_id", Key(26), nullable=True),
    Column("device_id", Key(26), nullable=True),
    Column("ip", String(45), nullable=True),
    Column("caller", String(64), nullable=True),
    Column("request_id", String(128), nullable=True),
    Column("details", Json, nullable=False),
    Index(None, "occurred_at"),
    Index(None, "type", "occurred_at"),
    Index(None, "user_id", "occurred_at"),
    **_MYSQL_TABLE,
)

# Single access tokens and signing keys withdrawn before their time (sessions keep theirs in
# sessions.revoked_at): the authority the deny-list cache is rebuilt from. The id orders every
# revocation; expired rows are purged by the cleanup job.
revocations = Table(
    "revocations",
    metadata,
    Column("id", LongId, primary_key=True, autoincrement=True),
    Column("kind", ascii_str(8), nullable=False),
    Column("value", ascii_str(64), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    UniqueConstraint("kind", "value"),
    Index(None, "expires_at"),
    **_MYSQL_TABLE,
)

# WebAuthn credentials (passkeys). credential_id is the authenticator's id (base64url, up to 1023
# bytes raw); the public key is COSE. sign_count and the backup flags are the last ones seen.
passkeys = Table(
    "passkeys",
    metadata,
    Column("id", Key(26), primary_key=True),
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("credential_id", ascii_str(1400), nullable=False),
    Column("public_key", Blob, nullable=False),
    Column("sign_count", LongId, nullable=False),
    Column("name", String(100), nullable=False),
    Column("transports", ascii_str(200), nullable=False, server_default=text("''")),
    Column("aaguid", ascii_str(36), nullable=False, server_default=text("''")),
    Column("backup_eligible", SmallInteger(), nullable=False, server_default=text("0")),
    Column("backed_up", SmallInteger(), nullable=False, server_default=text("0")),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("last_used_at", UtcDateTime(), nullable=True),
    Column("credential_hash", Key(43), nullable=False),
    UniqueConstraint("credential_hash"),
    Index(None, "user_id"),
    **_MYSQL_TABLE,
)

# Identities of other OpenID Connect providers linked to a user: one per provider and user, and a
# provider's subject belongs to one user only.
identities = Table(
    "identities",
    metadata,
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("provider", ascii_str(32), nullable=False),
    Column("subject", ascii_str(255), nullable=False),
    Column("email", String(254), nullable=False, server_default=text("''")),
    Column("linked_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("user_id", "provider"),
    UniqueConstraint("provider", "subject"),
    **_MYSQL_TABLE,
)

# TOTP (migration 0005): one enabled factor per user, its secret sealed under the master key's
# ``totp`` sub-key; ``last_step`` is the newest time-step a code was accepted for, advanced by a
# compare-and-set, so a code works once on every replica. Recovery codes are keyed hashes, spent
# once (``used_at``).
totp_factors = Table(
    "totp_factors",
    metadata,
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("secret_enc", Blob, nullable=False),
    Column("enabled_at", UtcDateTime(), nullable=False),
    Column("last_step", LongId, nullable=False),
    **_MYSQL_TABLE,
)

totp_recovery_codes = Table(
    "totp_recovery_codes",
    metadata,
    Column("code_hash", ascii_str(64), primary_key=True),
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("used_at", UtcDateTime(), nullable=True),
    Index(None, "user_id"),
    **_MYSQL_TABLE,
)

# Personal API tokens: only a keyed hash of each secret (api.md, ApiTokenService).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Key(26), primary_key=True),
    Column("user_id", Key(26), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("prefix", ascii_str(16), nullable=False),
    Column("secret_hash", Key(43), nullable=False),
    Column("key_version", SmallInteger(), nullable=False),
    Column("scopes", Json, nullable=False),
    Column("allowed_cidrs", Json, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("last_used_at", UtcDateTime(), nullable=True),
    Column("rotated_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column("revoke_reason", ascii_str(32), nullable=True),
    UniqueConstraint("secret_hash"),
    Index(None, "user_id", "revoked_at"),
    **_MYSQL_TABLE,
)

# The event outbox (api.md EventService): a row is inserted in the transaction of the change it
# describes, without a cursor (``seq`` NULL). A sequencer then numbers committed rows in one
# transaction at a time (core/events: auto-increment ids are handed out at insert, not at commit,
# so on MariaDB a smaller ``pos`` can become visible after a larger one; ``seq`` cannot). ``seq`` is
# the cursor a watcher resumes from.
events = Table(
    "events",
    metadata,
    Column("pos", LongId, primary_key=True, autoincrement=True),
    Column("seq", LongId, nullable=True),
    Column("id", Key(26), nullable=False),
    Column("kind", ascii_str(48), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("user_id", Key(26), nullable=True),
    Column("session_id", Key(26), nullable=True),
    Column("data", Json, nullable=False),
    UniqueConstraint("seq"),
    UniqueConstraint("id"),
    Index(None, "at"),
    **_MYSQL_TABLE,
)

# Named positions in the event stream: ``sequence`` (the last seq handed out), ``purged`` (every
# seq up to it was deleted by the retention job), one per push sink (the last seq it took on).
event_marks = Table(
    "event_marks",
    metadata,
    Column("name", ascii_str(32), primary_key=True),
    Column("value", LongId, nullable=False),
    **_MYSQL_TABLE,
)

# One push delivery of one event to one sink (a webhook): retried with backoff until delivered or
# dead (after the last attempt); ``iam-grpc events deliveries replay`` puts a dead one back.
event_deliveries = Table(
    "event_deliveries",
    metadata,
    Column("id", LongId, primary_key=True, autoincrement=True),
    Column("sink", ascii_str(16), nullable=False),
    Column("seq", LongId, nullable=False),
    Column("event_id", Key(26), nullable=False),
    Column("status", ascii_str(12), nullable=False),
    Column("attempts", SmallInteger(), nullable=False, server_default=text("0")),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("delivered_at", UtcDateTime(), nullable=True),
    Column("last_error", String(255), nullable=True),
    UniqueConstraint("sink", "seq"),
    Index(None, "status", "next_attempt_at"),
    **_MYSQL_TABLE,
)
