"""Ports: what core code needs from storage, as Protocols.

SQL state is reached through a unit of work: ``async with db.transaction() as
tx`` yields one connection with a store per table family (``tx.users``,
``tx.sessions``, ...), so a flow that touches several tables commits or rolls
back as one. Ephemeral state (limits, challenges, single-use marks,
deny-lists) is reached through :class:`Ephemeral`.

Adapters raise :class:`~iam_grpc.errors.BackendUnavailable` when their backend
cannot be reached, and :class:`Conflict` when a unique constraint refuses a
write. Core code never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from iam_grpc.storage.credential_ports import IdentityStore, PasskeyStore
from iam_grpc.storage.directory_ports import DirectoryStores
from iam_grpc.storage.event_ports import EventLog
from iam_grpc.storage.factor_ports import TotpStore
from iam_grpc.storage.mail_ports import (
    MailError,
    MailTransport,
    MessageRenderer,
    PermanentMailError,
    TransientMailError,
)
from iam_grpc.storage.records import (
    AuditEvent,
    Device,
    HitResult,
    LimitSpec,
    OutboxMessage,
    RefreshToken,
    SessionRecord,
    SigningKey,
    TokenContext,
    User,
    UserDevice,
)

__all__ = [
    "DENY_TAG",
    "AuditLog",
    "Conflict",
    "Database",
    "DeviceStore",
    "Ephemeral",
    "KeyStore",
    "LimiterStore",
    "MailError",
    "MailTransport",
    "Maintenance",
    "MessageRenderer",
    "Outbox",
    "PermanentMailError",
    "RevocationStore",
    "SessionStore",
    "Transaction",
    "TransientMailError",
    "UserStore",
    "hash_tag",
    "one_hash_tag",
]

DENY_TAG = "{deny}"
"""The hash tag of every deny-list key and of its generation marker. One tag puts them in one
slot, on one node of a Redis Cluster, so whatever loses entries (a restart, a failover) loses or
changes the marker that vouches for them too; and a store's server identity (the run_id the
marker names) is that node's."""


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes to pick its slot: the text between the first
    ``{`` and the next ``}`` when that is not empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def one_hash_tag(keys: Sequence[str]) -> None:
    """Refuse (ValueError) keys of different hash tags where one command must take them all."""
    tags = {hash_tag(key) for key in keys}
    if len(tags) > 1:
        raise ValueError("keys of one multi-key command must share a hash tag (Redis Cluster slots)")


class Conflict(Exception):
    """A unique constraint refused the write; ``constraint`` names which (e.g. ``email_norm``)."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class UserStore(Protocol):
    async def insert(self, user: User) -> None:
        """Create a user; :class:`Conflict` ("email_norm") when the address is taken."""
        ...

    async def get(self, user_id: str) -> User | None: ...

    async def get_by_email(self, email_norm: str) -> User | None: ...

    async def set_password(
        self,
        user_id: str,
        password_hash: str,
        pepper_id: int,
        now: datetime,
        *,
        expect_credential_version: int | None = None,
        bump_version: bool = True,
        verify_email: bool = False,
    ) -> bool:
        """Store a new hash (bumping ``credential_version`` unless it is a rehash).

        With ``expect_credential_version`` the update only happens while the
        version still has that value; ``verify_email`` sets ``email_verified_at`` if it is
        empty (a reset link proved the mailbox). Returns whether a row changed.
        """
        ...

    async def change_email(
        self,
        user_id: str,
        email: str,
        email_norm: str,
        now: datetime,
        *,
        expect_email_norm: str,
        expect_credential_version: int,
    ) -> bool:
        """Move the account to a new address (verified now) while its address and credential
        version are still the expected ones, and bump the credential version (links mailed to the
        old address stop working); :class:`Conflict` ("users.email_norm") when the new address is
        taken. Returns whether a row changed."""
        ...

    async def set_status(self, user_id: str, status: str, now: datetime) -> bool: ...

    async def set_mfa_hold(self, user_id: str, until: datetime | None, now: datetime) -> None:
        """Require MFA at every login until ``until`` (refresh-token reuse, behaviour.md 1.5)."""
        ...

    async def record_login(self, user_id: str, now: datetime) -> None: ...

    async def mark_email_verified(self, user_id: str, now: datetime) -> None:
        """The user proved the mailbox (an MFA code or link): ``email_verified_at`` if still empty."""
        ...

    async def ensure_roles(self, names: Sequence[str], now: datetime) -> None:
        """Create the roles that do not exist yet."""
        ...

    async def grant_role(self, user_id: str, role: str, granted_by: str, now: datetime) -> bool:
        """Grant an existing role; False when the user already had it."""
        ...

    async def revoke_role(self, user_id: str, role: str) -> bool: ...

    async def roles_of(self, user_id: str) -> list[str]:
        """Role names of the user, sorted."""
        ...

    async def list_roles(self) -> list[tuple[str, str | None, int]]:
        """(name, description, number of holders), by name."""
        ...

    async def delete_role(self, name: str) -> bool:
        """Remove a role and every grant of it."""
        ...


class DeviceStore(Protocol):
    async def insert(self, device: Device) -> None: ...

    async def get(self, device_id: str) -> Device | None: ...

    async def update(self, device: Device) -> None:
        """Replace the stored row (user agent, parsed fields, ``last_seen_at``)."""
        ...

    async def get_link(self, user_id: str, device_id: str) -> UserDevice | None:
        """One user's relationship with one device."""
        ...

    async def save_link(self, link: UserDevice) -> None:
        """Insert or replace a user-device row."""
        ...

    async def links_of(self, user_id: str) -> list[UserDevice]: ...

    async def touch_link(self, user_id: str, device_id: str, now: datetime, ip: str) -> None:
        """Record activity on a user-device (``last_seen_at``, ``last_ip``)."""
        ...


class SessionStore(Protocol):
    async def insert(self, session: SessionRecord) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def list_live(self, user_id: str, now: datetime) -> list[SessionRecord]:
        """Sessions not revoked and not past their absolute expiry, newest activity first."""
        ...

    async def revoke(self, session_id: str, reason: str, now: datetime) -> bool:
        """Mark a live session revoked and its tokens ``revoked``; False when it already was."""
        ...

    async def revoke_all(
        self, user_id: str, reason: str, now: datetime, *, keep: str | None = None
    ) -> list[str]:
        """Revoke every live session of a user (but ``keep``); returns the ids revoked."""
        ...

    async def touch(
        self,
        session_id: str,
        now: datetime,
        *,
        ip: str,
        browser: str | None = None,
        os: str | None = None,
        country: str | None = None,
        region: str | None = None,
        city: str | None = None,
    ) -> None:
        """Record a refresh: ``last_refreshed_at`` and where it came from."""
        ...

    async def end(self, session_id: str, reason: str, now: datetime) -> bool:
        """Mark a session ended by time (``idle``/``expired``): like revoke, without being a revocation
        anyone asked for."""
        ...

    async def rebind(self, session_id: str, device_id: str) -> None:
        """Move a session to another device (a NEW_DEVICE challenge completed there)."""
        ...

    async def set_auth(self, session_id: str, now: datetime, *, mfa: bool = False) -> None:
        """A strong authentication happened now (password, MFA, step-up)."""
        ...

    async def revoked_since(self, since: datetime) -> list[str]:
        """Ids of sessions revoked at or after ``since`` (deny-list replay)."""
        ...

    async def insert_token(self, token: RefreshToken) -> int:
        """Store a refresh-token row and return its id."""
        ...

    async def token_with_context(self, token_hash: str) -> TokenContext | None:
        """The token, its session, its user and the user's roles in one query (the Refresh hot path)."""
        ...

    async def tokens_of(self, session_id: str) -> list[RefreshToken]:
        """The session's chain, oldest first."""
        ...

    async def mark_rotated(self, token_id: int, successor_id: int | None, now: datetime) -> bool:
        """``active`` -> ``rotated`` (compare-and-set); False when it was not active."""
        ...

    async def token(self, token_id: int) -> RefreshToken | None: ...

    async def recent_rotations(self, session_id: str, since: datetime) -> int:
        """How many rotations of the session (tokens of generation 1 and up) were created at or
        after ``since`` (rotation burst)."""
        ...

    async def access_jtis_since(self, user_id: str, since: datetime) -> list[str]:
        """``access_jti`` of every token minted for the user since ``since`` (roles revoke --now)."""
        ...


class KeyStore(Protocol):
    async def insert(self, key: SigningKey) -> None: ...

    async def all(self) -> list[SigningKey]:
        """Every key row, oldest ``activate_at`` first."""
        ...

    async def retire(
        self,
        kid: str,
        *,
        deactivate_at: datetime | None = None,
        unpublish_at: datetime | None = None,
        destroy_at: datetime | None = None,
    ) -> bool:
        """Set retirement times; ``destroy_at`` also erases the private key."""
        ...


class Outbox(Protocol):
    async def enqueue(self, message: OutboxMessage) -> int | None:
        """Queue a message and return its id; None when its ``dedupe_key`` is already taken
        (the transaction goes on: a burst of notices sends one)."""
        ...

    async def seal(self, message_id: int, sealed_params: bytes) -> None:
        """Attach the sealed secrets (sealed with the row id as associated data)."""
        ...

    async def get(self, message_id: int) -> OutboxMessage | None: ...

    async def claim(self, now: datetime, worker: str, limit: int, lease: timedelta) -> list[OutboxMessage]:
        """Claim due pending rows (priority first) for ``lease``; no two workers get one row."""
        ...

    async def mark_sent(
        self, message_id: int, worker: str, now: datetime, provider_id: str | None
    ) -> bool: ...

    async def mark_failed(
        self, message_id: int, worker: str, error: str, *, retry_at: datetime | None, now: datetime
    ) -> bool:
        """Record a failed attempt: retry at ``retry_at``, or ``dead`` when it is None."""
        ...

    async def mark_expired(self, message_id: int, worker: str) -> bool: ...

    async def release(self, worker: str) -> int:
        """Give back this worker's claims on rows it has not finished (shutdown)."""
        ...

    async def retry(self, message_id: int, now: datetime) -> bool:
        """Make a dead row without secrets pending again (operator action), while its deadline holds."""
        ...

    async def list(self, status: str | None = None, limit: int = 100) -> list[OutboxMessage]: ...


class AuditLog(Protocol):
    async def append(self, event: AuditEvent) -> None: ...

    async def recent(
        self, *, user_id: str | None = None, type_prefix: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        """Newest first."""
        ...


class Maintenance(Protocol):
    """Batched purges for the cleanup job; each returns how many rows it removed."""

    async def purge_refresh_tokens(self, used_before: datetime, now: datetime, batch: int) -> int:
        """Rotated or revoked tokens untouched since ``used_before`` whose session is over at
        ``now`` (a live session keeps every rotated token, so replays stay recognised)."""
        ...

    async def purge_sessions(self, ended_before: datetime, now: datetime, batch: int) -> int: ...

    async def purge_outbox(self, done_before: datetime, dead_before: datetime, batch: int) -> int: ...

    async def wipe_outbox_secrets(self, batch: int) -> int: ...

    async def purge_audit(self, before: datetime, batch: int) -> int: ...

    async def purge_devices(self, unseen_before: datetime, batch: int) -> int: ...

    async def purge_revocations(self, now: datetime, batch: int) -> int: ...


class RevocationStore(Protocol):
    """Single access tokens (kind ``jti``) and signing keys (``kid``) revoked: the authority of the
    deny-list (sessions keep theirs in ``sessions.revoked_at``)."""

    async def add(self, kind: str, values: Sequence[str], now: datetime, until: datetime) -> None:
        """Record ``values`` revoked until ``until`` (a repeat keeps one row, with the later expiry)."""
        ...

    async def find(self, wanted: Sequence[tuple[str, str]], now: datetime) -> set[tuple[str, str]]:
        """Which of the (kind, value) pairs are revoked now."""
        ...

    async def active(self, now: datetime) -> list[tuple[str, str]]:
        """Every (kind, value) revoked and not yet expired, oldest first."""
        ...


class Transaction(DirectoryStores, Protocol):
    """One database transaction with a store per table family."""

    @property
    def users(self) -> UserStore: ...

    @property
    def devices(self) -> DeviceStore: ...

    @property
    def sessions(self) -> SessionStore: ...

    @property
    def keys(self) -> KeyStore: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def maintenance(self) -> Maintenance: ...

    @property
    def revocations(self) -> RevocationStore: ...

    @property
    def passkeys(self) -> PasskeyStore: ...

    @property
    def identities(self) -> IdentityStore: ...

    @property
    def totp(self) -> TotpStore: ...

    @property
    def events(self) -> EventLog: ...

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the transaction has committed (never after a rollback)."""
        ...


class Database(Protocol):
    """The SQL database (SQLite or MySQL)."""

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``mysql``."""
        ...

    def transaction(self, *, read_only: bool = False) -> AbstractAsyncContextManager[Transaction]:
        """Commit on normal exit, roll back on an exception. ``read_only`` promises no writes, so
        SQLite need not take its single write lock (the statements still see one snapshot)."""
        ...

    def named_lock(self, name: str, timeout: timedelta) -> AbstractAsyncContextManager[bool]:
        """A cross-process lock (MySQL ``GET_LOCK``; a process lock on SQLite). Yields whether held."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~iam_grpc.errors.BackendUnavailable` unless a trivial query works."""
        ...

    async def close(self) -> None: ...


class LimiterStore(Protocol):
    """Rate-limit state, one entry per (group, key), changed atomically (behaviour.md 8.5).

    Times come from the caller's clock (``now_ms``), so every replica and the
    tests agree on windows; the store's own expiry only collects garbage.
    """

    async def hit(self, key: str, spec: LimitSpec, now_ms: int, cost: int = 1) -> HitResult:
        """Consume from every window of the union, or refuse (strikes, blocks) in one step."""
        ...

    async def refund(
        self,
        key: str,
        spec: LimitSpec,
        now_ms: int,
        windows: tuple[int, ...],
        buckets: tuple[int, ...],
        cost: int = 1,
    ) -> None:
        """Give back a reservation to the listed windows."""
        ...

    async def reset(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        """Forget the listed windows' counts (a success resets consecutive failures)."""
        ...

    async def leave_one(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        """Set the listed windows one point short of full, keeping strikes and blocks."""
        ...

    async def peek(self, key: str, spec: LimitSpec, now_ms: int) -> dict[str, Any]:
        """Estimates, strikes and block of a key, unchanged (for operators)."""
        ...

    async def clear(self, key: str) -> bool:
        """Remove every count, strike and block of a key."""
        ...

    async def ping(self) -> None: ...


class Ephemeral(Protocol):
    """Short-lived shared state with TTLs: Redis in production, in-process when embedded.

    Every write has a TTL; nothing here is meant to live forever. Values are
    bytes. Keys are given without the configured prefix.
    """

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in their order (None for a missing key), in one round trip.

        On Redis this is one MGET, which a Redis Cluster accepts only when every
        key maps to one slot: callers must give keys that share a hash tag (the
        ``{...}`` part), as the hourly buckets of one risk subject do. Every store
        refuses other keys with ValueError, so a mistake shows on any backend.
        """
        ...

    async def values(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in their order (None for a missing key), in one round trip of
        separate reads (so the keys may hash to different slots, unlike :meth:`get_many`)."""
        ...

    async def set(self, key: str, value: bytes, ttl: timedelta) -> None: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: timedelta) -> None:
        """Store every (key, value) with one TTL, in as few round trips as the store allows (not
        atomically: after a failure some may be stored)."""
        ...

    async def set_many_waiting(
        self, items: Sequence[tuple[str, bytes]], ttl: timedelta, *, within: timedelta
    ) -> bool:
        """:meth:`set_many` that does not give up at the first failure: tried again, even while
        calls fail fast, until stored (True) or ``within`` has passed or the store refuses
        connections, as one that is not running does (False). Never raises BackendUnavailable."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl: timedelta) -> bool:
        """Store only when the key does not exist; True when stored."""
        ...

    async def get_and_delete(self, key: str) -> bytes | None:
        """Atomically read and remove (single-use values)."""
        ...

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
    ) -> bool:
        """Replace the value only while it equals ``expected``; keep the TTL when ``ttl`` is None."""
        ...

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete the key only while its value equals ``expected`` (atomically); True if deleted."""
        ...

    async def extend(self, key: str, expected: bytes, ttl: timedelta) -> bool:
        """A lease: give the key ``ttl`` more to live while it holds ``expected`` (True), tried
        even while other calls fail fast, so a store that is only slow does not end the lease."""
        ...

    async def incr(self, key: str, amount: int, ttl: timedelta) -> int:
        """Add to a counter (created at 0 with ``ttl``; the TTL is not extended) and return it."""
        ...

    async def delete(self, *keys: str) -> int: ...

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` exist, in one round trip."""
        ...

    async def ttl(self, key: str) -> timedelta | None:
        """Remaining lifetime, or None when the key does not exist."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
