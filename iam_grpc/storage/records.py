"""Plain records that cross the port boundary (one per table of behaviour.md 10).

They carry no behaviour and no I/O; adapters build them from rows and core code
builds them to write. Every time is timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ApiTokenRecord",
    "AuditEvent",
    "Device",
    "EventDelivery",
    "EventRecord",
    "HitResult",
    "IdentityRecord",
    "LimitSpec",
    "LimitWindow",
    "OutboxMessage",
    "PasskeyRecord",
    "RefreshToken",
    "SessionRecord",
    "SigningKey",
    "TokenContext",
    "User",
    "UserDevice",
    "UserQuery",
]


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    email_norm: str
    password_hash: str | None
    pepper_id: int
    name: str
    terms_accepted_at: datetime
    created_at: datetime
    updated_at: datetime
    last_name: str = ""
    locale: str | None = None
    email_verified_at: datetime | None = None
    credential_version: int = 1
    password_changed_at: datetime | None = None
    status: str = "active"
    disabled_at: datetime | None = None
    mfa_hold_until: datetime | None = None
    last_login_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    created_at: datetime
    last_seen_at: datetime
    user_agent: str | None = None
    browser_family: str | None = None
    browser_major: str | None = None
    os_family: str | None = None
    os_major: str | None = None
    device_brand: str | None = None
    device_model: str | None = None
    device_type: str | None = None


@dataclass(frozen=True, slots=True)
class UserDevice:
    user_id: str
    device_id: str
    first_seen_at: datetime
    last_seen_at: datetime
    baseline: dict[str, Any] = field(default_factory=dict)
    known_networks: list[dict[str, Any]] = field(default_factory=list)
    # {code, seen_at} objects, most recent last (6.2); a bare code from before countries were timed
    # is still read (see core.fingerprint.learn_country).
    known_countries: list[Any] = field(default_factory=list)
    trusted_at: datetime | None = None
    trust_revoked_at: datetime | None = None
    last_ip: str | None = None
    last_lat: float | None = None
    last_lon: float | None = None
    last_accuracy_km: int | None = None
    last_located_at: datetime | None = None
    proxy_allowed_until: datetime | None = None
    hosting_allowed_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    user_id: str
    device_id: str
    created_at: datetime
    auth_at: datetime
    last_refreshed_at: datetime
    absolute_expires_at: datetime
    created_ip: str
    last_ip: str
    mfa_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    last_country: str | None = None
    last_region: str | None = None
    last_city: str | None = None
    last_browser: str | None = None
    last_os: str | None = None


@dataclass(frozen=True, slots=True)
class RefreshToken:
    session_id: str
    token_hash: str
    key_version: int
    generation: int
    state: str  # active, rotated, revoked
    created_at: datetime
    expires_at: datetime
    access_jti: str
    id: int | None = None  # assigned by the database
    used_at: datetime | None = None
    successor_id: int | None = None


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    public_jwk: dict[str, Any]
    private_key_enc: bytes | None
    created_at: datetime
    publish_at: datetime
    activate_at: datetime
    deactivate_at: datetime | None = None
    unpublish_at: datetime | None = None
    destroyed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    kind: str
    recipient: str
    recipient_h: str
    locale: str
    params: dict[str, Any]
    priority: int
    next_attempt_at: datetime
    created_at: datetime
    not_after: datetime
    status: str = "pending"  # pending, sent, expired, suppressed, dead
    user_id: str | None = None
    sealed_params: bytes | None = None
    attempts: int = 0
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    sent_at: datetime | None = None
    last_error: str | None = None
    provider_message_id: str | None = None
    dedupe_key: str | None = None
    id: int | None = None  # assigned by the database


@dataclass(frozen=True, slots=True)
class AuditEvent:
    occurred_at: datetime
    type: str
    outcome: str  # ok, fail, info
    details: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    session_id: str | None = None
    device_id: str | None = None
    ip: str | None = None
    caller: str | None = None
    request_id: str | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class TokenContext:
    """A refresh token with its session, user, the user's role names and the session's
    user-device link (one query)."""

    token: RefreshToken
    session: SessionRecord
    user: User
    roles: tuple[str, ...]
    link: UserDevice | None = None


@dataclass(frozen=True, slots=True)
class LimitWindow:
    points: int
    length_ms: int


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """What the store needs to know about a group."""

    windows: tuple[LimitWindow, ...]
    max_strikes: int  # 0: refusals never block
    block_ms: int
    block_max_ms: int

    @property
    def longest_ms(self) -> int:
        return max(w.length_ms for w in self.windows)


@dataclass(frozen=True, slots=True)
class HitResult:
    allowed: bool
    retry_ms: int  # 0 when allowed
    blocked: bool  # refused because a block is in force (imposed now or earlier)
    new_block_ms: int  # > 0: a block of this length was imposed by this call
    buckets: tuple[int, ...]  # bucket index consumed in each window (for refunds)


@dataclass(frozen=True, slots=True)
class PasskeyRecord:
    """A registered WebAuthn credential (``passkeys`` row)."""

    id: str
    user_id: str
    credential_id: str  # base64url, as the browser reports it
    public_key: bytes  # COSE
    sign_count: int
    name: str
    created_at: datetime
    credential_hash: str  # sha256 of credential_id, base64url: the unique lookup key
    transports: str = ""  # comma separated
    aaguid: str = ""
    backup_eligible: int = 0
    backed_up: int = 0
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """An identity of another OpenID Connect provider linked to a user (``identities`` row)."""

    user_id: str
    provider: str
    subject: str
    email: str
    linked_at: datetime


@dataclass(frozen=True, slots=True)
class ApiTokenRecord:
    """A personal API token: its metadata and the keyed hash of its current secret."""

    id: str
    user_id: str
    name: str
    prefix: str
    secret_hash: str
    key_version: int
    scopes: list[str]
    allowed_cidrs: list[str]
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    rotated_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None


@dataclass(frozen=True, slots=True)
class UserQuery:
    """One page of ListUsers: users after ``after_id`` in id order, filtered."""

    limit: int
    after_id: str | None = None
    email_prefix: str | None = None
    role: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One row of the event outbox; ``seq`` (the stream cursor) is None until sequenced."""

    id: str
    kind: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    session_id: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class EventDelivery:
    """One push delivery of one event to one sink, with its retry state."""

    id: int
    sink: str
    seq: int
    event_id: str
    status: str  # pending, delivered, dead
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None = None
    last_error: str | None = None
