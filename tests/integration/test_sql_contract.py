"""Contract of the SQL ports (users, devices, sessions, keys, outbox, audit),
run against SQLite and MariaDB/MySQL."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, StatementError

from iam_grpc import ids
from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage.ports import Conflict
from iam_grpc.storage.records import (
    AuditEvent,
    Device,
    OutboxMessage,
    RefreshToken,
    SessionRecord,
    SigningKey,
    User,
    UserDevice,
)
from iam_grpc.storage.sql import migrate
from iam_grpc.storage.sql.connection import InlineConnection
from iam_grpc.storage.sql.database import SqlDatabase

NOW = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)


def new_user(email: str | None = None, **changes: object) -> User:
    address = email or f"u{secrets.token_hex(6)}@example.com"
    fields: dict[str, object] = {
        "id": ids.new_ulid(NOW),
        "email": address,
        "email_norm": address.lower(),
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
        "pepper_id": 1,
        "name": "Zoë <b>",
        "terms_accepted_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }
    fields.update(changes)
    return User(**fields)  # type: ignore[arg-type]


def new_device(**changes: object) -> Device:
    fields: dict[str, object] = {"id": ids.new_device_id(), "created_at": NOW, "last_seen_at": NOW}
    fields.update(changes)
    return Device(**fields)  # type: ignore[arg-type]


async def user_with_session(
    db: SqlDatabase, *, absolute: timedelta = timedelta(days=30)
) -> tuple[User, SessionRecord]:
    user, device = new_user(), new_device()
    session = SessionRecord(
        id=ids.new_ulid(NOW),
        user_id=user.id,
        device_id=device.id,
        created_at=NOW,
        auth_at=NOW,
        last_refreshed_at=NOW,
        absolute_expires_at=NOW + absolute,
        created_ip="192.0.2.1",
        last_ip="192.0.2.1",
    )
    async with db.transaction() as tx:
        await tx.users.insert(user)
        await tx.devices.insert(device)
        await tx.sessions.insert(session)
    return user, session


def new_token(session_id: str, generation: int = 0, expires: timedelta = timedelta(days=7)) -> RefreshToken:
    return RefreshToken(
        session_id=session_id,
        token_hash=ids.b64url(secrets.token_bytes(32)),
        key_version=1,
        generation=generation,
        state="active",
        created_at=NOW,
        expires_at=NOW + expires,
        access_jti=ids.new_jti(),
    )


# users ---------------------------------------------------------------------------


async def test_user_round_trips_with_exact_times_and_text(database: SqlDatabase) -> None:
    """A stored user reads back field for field: aware UTC times with microseconds, unicode and markup verbatim."""
    user = new_user(last_name="O'Brien", locale="fr", mfa_hold_until=NOW + timedelta(days=7))
    async with database.transaction() as tx:
        await tx.users.insert(user)
    async with database.transaction() as tx:
        assert await tx.users.get(user.id) == user
        assert await tx.users.get_by_email(user.email_norm) == user
        assert await tx.users.get("0" * 26) is None


async def test_email_norm_is_unique_and_a_duplicate_rolls_back(database: SqlDatabase) -> None:
    """A taken normalised address raises Conflict naming users.email_norm, and nothing of that transaction stays."""
    first = new_user()
    async with database.transaction() as tx:
        await tx.users.insert(first)
    device = new_device()
    with pytest.raises(Conflict) as caught:
        async with database.transaction() as tx:
            await tx.devices.insert(device)
            await tx.users.insert(new_user(email=first.email))
    assert caught.value.constraint == "users.email_norm"
    async with database.transaction() as tx:
        assert await tx.devices.get(device.id) is None


async def test_email_norm_compares_exactly(database: SqlDatabase) -> None:
    """The database never folds case or accents of email_norm: we normalise, it compares bytes."""
    local = secrets.token_hex(4)
    async with database.transaction() as tx:
        await tx.users.insert(new_user(email=f"{local}@example.com"))
        await tx.users.insert(new_user(email=f"{local}é@example.com"))
        await tx.users.insert(new_user(email=f"{local}e@example.com"))
    async with database.transaction() as tx:
        assert await tx.users.get_by_email(f"{local.upper()}@EXAMPLE.COM") is None
        found = await tx.users.get_by_email(f"{local}é@example.com")
        assert found is not None
        assert found.email_norm == f"{local}é@example.com"


async def test_naive_datetimes_are_refused(database: SqlDatabase) -> None:
    """Every time must be timezone-aware; a naive one is an error, not a silent local time."""
    with pytest.raises(StatementError, match="naive datetime"):
        async with database.transaction() as tx:
            await tx.users.insert(new_user(created_at=datetime(2026, 1, 1)))


async def test_set_password_bumps_the_credential_version_conditionally(database: SqlDatabase) -> None:
    """A password change bumps credential_version only while the expected version holds; a rehash keeps it."""
    user = new_user()
    async with database.transaction() as tx:
        await tx.users.insert(user)
        assert await tx.users.set_password(user.id, "h2", 2, NOW, expect_credential_version=1)
        assert not await tx.users.set_password(user.id, "h3", 2, NOW, expect_credential_version=1)
        assert await tx.users.set_password(user.id, "h4", 3, NOW, bump_version=False)
        stored = await tx.users.get(user.id)
    assert stored is not None
    assert (stored.password_hash, stored.pepper_id, stored.credential_version) == ("h4", 3, 2)
    assert stored.password_changed_at == NOW


async def test_status_changes_record_when(database: SqlDatabase) -> None:
    """Disabling sets disabled_at; enabling clears it."""
    user = new_user()
    async with database.transaction() as tx:
        await tx.users.insert(user)
        assert await tx.users.set_status(user.id, "disabled", NOW)
        disabled = await tx.users.get(user.id)
        assert await tx.users.set_status(user.id, "active", NOW)
        enabled = await tx.users.get(user.id)
        assert not await tx.users.set_status("0" * 26, "disabled", NOW)
    assert disabled is not None
    assert (disabled.status, disabled.disabled_at) == ("disabled", NOW)
    assert enabled is not None
    assert (enabled.status, enabled.disabled_at) == ("active", None)


async def test_roles_are_granted_listed_sorted_and_revoked(database: SqlDatabase) -> None:
    """Roles exist once, grants are idempotent, roles_of is sorted, revoke removes one grant."""
    user = new_user()
    suffix = secrets.token_hex(3)
    zeta, alpha = f"zeta-{suffix}", f"alpha-{suffix}"
    async with database.transaction() as tx:
        await tx.users.insert(user)
        await tx.users.ensure_roles([zeta, alpha, zeta], NOW)
        await tx.users.ensure_roles([alpha], NOW)
        assert await tx.users.grant_role(user.id, zeta, "cli", NOW)
        assert await tx.users.grant_role(user.id, alpha, "cli", NOW)
        assert not await tx.users.grant_role(user.id, alpha, "cli", NOW)
        assert await tx.users.roles_of(user.id) == [alpha, zeta]
        assert await tx.users.revoke_role(user.id, zeta)
        assert not await tx.users.revoke_role(user.id, zeta)
        assert await tx.users.roles_of(user.id) == [alpha]
        with pytest.raises(LookupError):
            await tx.users.grant_role(user.id, f"missing-{suffix}", "cli", NOW)


# devices -----------------------------------------------------------------------


async def test_devices_and_user_devices_round_trip_and_upsert(database: SqlDatabase) -> None:
    """Device rows update in place; a user-device is inserted then replaced, JSON fields intact."""
    user, device = new_user(), new_device(user_agent="Mozilla/5.0", browser_family="Firefox")
    link = UserDevice(
        user_id=user.id,
        device_id=device.id,
        first_seen_at=NOW,
        last_seen_at=NOW,
        baseline={"browser_family": "Firefox", "os_family": "Linux"},
        known_networks=[
            {"prefix": "192.0.2.0/24", "asn": 64500, "country": "DE", "seen_at": NOW.isoformat()}
        ],
        known_countries=["DE"],
        last_lat=52.52,
        last_lon=13.405,
    )
    later = NOW + timedelta(hours=1)
    async with database.transaction() as tx:
        await tx.users.insert(user)
        await tx.devices.insert(device)
        await tx.devices.update(new_device(id=device.id, last_seen_at=later, browser_family="Chrome"))
        await tx.devices.save_link(link)
        assert await tx.devices.get_link(user.id, device.id) == link
        trusted = replace(link, trusted_at=later, last_seen_at=later)
        await tx.devices.save_link(trusted)
        stored_device = await tx.devices.get(device.id)
        links = await tx.devices.links_of(user.id)
    assert stored_device is not None
    assert (stored_device.browser_family, stored_device.last_seen_at, stored_device.created_at) == (
        "Chrome",
        later,
        NOW,
    )
    assert links == [trusted]
    assert links[0].trusted_at == later


# sessions and refresh tokens ---------------------------------------------------------


async def test_a_token_comes_with_its_session_user_and_roles_in_one_lookup(database: SqlDatabase) -> None:
    """token_with_context: the row, its session, its user and role names; None for an unknown hash."""
    user, session = await user_with_session(database)
    token = new_token(session.id)
    async with database.transaction() as tx:
        await tx.users.ensure_roles(["user", "support"], NOW)
        await tx.users.grant_role(user.id, "support", "test", NOW)
        await tx.users.grant_role(user.id, "user", "test", NOW)
        await tx.sessions.insert_token(token)
    other_user, other_session = await user_with_session(database)
    bare = new_token(other_session.id)
    async with database.transaction() as tx:
        await tx.sessions.insert_token(bare)
        found = await tx.sessions.token_with_context(token.token_hash)
        without_roles = await tx.sessions.token_with_context(bare.token_hash)
        assert await tx.sessions.token_with_context(ids.b64url(secrets.token_bytes(32))) is None
    assert found is not None
    assert (found.token.token_hash, found.session, found.user.id, found.user.email) == (
        token.token_hash,
        session,
        user.id,
        user.email,
    )
    assert sorted(found.roles) == ["support", "user"]
    assert without_roles is not None
    assert (without_roles.user.id, without_roles.roles) == (other_user.id, ())


async def test_a_token_comes_with_all_of_32_roles_of_64_characters(database: SqlDatabase) -> None:
    """The most roles a user may hold (1.4), each as long as a name may be, all come back, even
    where the server cuts aggregated strings at 1024 bytes (MySQL 8's group_concat_max_len)."""
    user, session = await user_with_session(database)
    token = new_token(session.id)
    names = [f"r{i:02d}" + secrets.token_hex(32)[:61] for i in range(32)]
    assert {len(name) for name in names} == {64}
    async with database.transaction() as tx:
        await tx.users.ensure_roles(names, NOW)
        for name in names:
            await tx.users.grant_role(user.id, name, "test", NOW)
        await tx.sessions.insert_token(token)
    async with database.transaction() as tx:
        if database.dialect == "mysql":
            await tx.connection.execute(text("SET SESSION group_concat_max_len = 1024"))
        try:
            found = await tx.sessions.token_with_context(token.token_hash)
        finally:
            if database.dialect == "mysql":
                await tx.connection.execute(text("SET SESSION group_concat_max_len = DEFAULT"))
    assert found is not None
    assert found.roles == tuple(sorted(names))
    assert found.user.id == user.id


async def test_touching_a_device_link_updates_only_that_link(database: SqlDatabase) -> None:
    """touch_link sets last_seen_at and last_ip of one (user, device) link and leaves trust alone."""
    user, session = await user_with_session(database)
    link = UserDevice(
        user_id=user.id, device_id=session.device_id, first_seen_at=NOW, last_seen_at=NOW, trusted_at=NOW
    )
    later = NOW + timedelta(minutes=5)
    async with database.transaction() as tx:
        await tx.devices.save_link(link)
        await tx.devices.touch_link(user.id, session.device_id, later, "198.51.100.9")
        await tx.devices.touch_link(user.id, "no-such-device", later, "198.51.100.10")
        touched = await tx.devices.get_link(user.id, session.device_id)
    assert touched is not None
    assert (touched.last_seen_at, touched.last_ip, touched.trusted_at, touched.first_seen_at) == (
        later,
        "198.51.100.9",
        NOW,
        NOW,
    )


async def test_refresh_tokens_are_found_by_hash_and_rotate_once(database: SqlDatabase) -> None:
    """mark_rotated is a compare-and-set: only an active token rotates, and only once."""
    _, session = await user_with_session(database)
    token = new_token(session.id)
    async with database.transaction() as tx:
        token_id = await tx.sessions.insert_token(token)
        successor_id = await tx.sessions.insert_token(new_token(session.id, generation=1))
    async with database.transaction() as tx:
        found = await tx.sessions.token_with_context(token.token_hash)
        assert found is not None
        assert (found.token.id, found.token.state, found.token.created_at) == (token_id, "active", NOW)
        assert await tx.sessions.mark_rotated(token_id, successor_id, NOW + timedelta(seconds=1))
        assert not await tx.sessions.mark_rotated(token_id, successor_id, NOW + timedelta(seconds=2))
        context = await tx.sessions.token_with_context(token.token_hash)
        chain = await tx.sessions.tokens_of(session.id)
    assert context is not None
    rotated = context.token
    assert (rotated.state, rotated.successor_id, rotated.used_at) == (
        "rotated",
        successor_id,
        NOW + timedelta(seconds=1),
    )
    assert [t.generation for t in chain] == [0, 1]


async def test_token_hash_is_unique(database: SqlDatabase) -> None:
    """Two tokens can never share a hash."""
    _, session = await user_with_session(database)
    token = new_token(session.id)
    async with database.transaction() as tx:
        await tx.sessions.insert_token(token)
    with pytest.raises(Conflict) as caught:
        async with database.transaction() as tx:
            await tx.sessions.insert_token(token)
    assert caught.value.constraint == "refresh_tokens.token_hash"


async def test_concurrent_rotations_have_one_winner(database: SqlDatabase) -> None:
    """Ten transactions rotating the same token: exactly one changes it."""
    _, session = await user_with_session(database)
    async with database.transaction() as tx:
        token_id = await tx.sessions.insert_token(new_token(session.id))

    async def rotate() -> bool:
        async with database.transaction() as tx:
            return await tx.sessions.mark_rotated(token_id, None, NOW)

    results = await asyncio.gather(*(rotate() for _ in range(10)))
    assert results.count(True) == 1


async def test_revoking_a_session_revokes_its_tokens_once(database: SqlDatabase) -> None:
    """revoke marks the session and every token of its chain; a second revoke changes nothing."""
    _, session = await user_with_session(database)
    async with database.transaction() as tx:
        await tx.sessions.insert_token(new_token(session.id))
        await tx.sessions.insert_token(new_token(session.id, generation=1))
        assert await tx.sessions.revoke(session.id, "logout", NOW + timedelta(minutes=1))
        assert not await tx.sessions.revoke(session.id, "logout", NOW + timedelta(minutes=2))
        stored = await tx.sessions.get(session.id)
        chain = await tx.sessions.tokens_of(session.id)
        recent = await tx.sessions.revoked_since(NOW)
    assert stored is not None
    assert (stored.revoked_at, stored.revoke_reason) == (NOW + timedelta(minutes=1), "logout")
    assert {t.state for t in chain} == {"revoked"}
    assert session.id in recent


async def test_list_live_skips_revoked_expired_and_idle_sessions(database: SqlDatabase) -> None:
    """Live means: not revoked, before the absolute expiry, and holding an active unexpired token."""
    user, live = await user_with_session(database)
    device = new_device()

    def session_for(absolute: timedelta, refreshed: timedelta) -> SessionRecord:
        return SessionRecord(
            id=ids.new_ulid(NOW),
            user_id=user.id,
            device_id=device.id,
            created_at=NOW,
            auth_at=NOW,
            last_refreshed_at=NOW + refreshed,
            absolute_expires_at=NOW + absolute,
            created_ip="::1",
            last_ip="::1",
        )

    newer = session_for(timedelta(days=30), timedelta(minutes=5))
    revoked = session_for(timedelta(days=30), timedelta(0))
    expired = session_for(timedelta(seconds=1), timedelta(0))
    idle = session_for(timedelta(days=30), timedelta(0))
    async with database.transaction() as tx:
        await tx.devices.insert(device)
        for session in (newer, revoked, expired, idle):
            await tx.sessions.insert(session)
        for session in (live, newer, revoked, expired):
            await tx.sessions.insert_token(new_token(session.id))
        await tx.sessions.insert_token(new_token(idle.id, expires=timedelta(seconds=1)))
        await tx.sessions.revoke(revoked.id, "user", NOW)
        listed = await tx.sessions.list_live(user.id, NOW + timedelta(minutes=1))
    assert [s.id for s in listed] == [newer.id, live.id]


# keys ----------------------------------------------------------------------------------


async def test_signing_keys_round_trip_and_destroy_erases_the_private_part(database: SqlDatabase) -> None:
    """Keys list oldest activation first; destroying one wipes its encrypted private key."""
    first = SigningKey(
        kid="k1-" + secrets.token_hex(4),
        alg="ES256",
        public_jwk={"kty": "EC", "crv": "P-256", "x": "a", "y": "b"},
        private_key_enc=b"\x00\x01sealed",
        created_at=NOW,
        publish_at=NOW,
        activate_at=NOW - timedelta(days=1000),
    )
    async with database.transaction() as tx:
        await tx.keys.insert(first)
        assert await tx.keys.retire(first.kid, deactivate_at=NOW, unpublish_at=NOW + timedelta(hours=1))
        assert await tx.keys.retire(first.kid, destroy_at=NOW)
        assert not await tx.keys.retire(first.kid)
        rows = await tx.keys.all()
    stored = next(row for row in rows if row.kid == first.kid)
    assert rows[0].activate_at <= rows[-1].activate_at
    assert stored.private_key_enc is None
    assert (stored.deactivate_at, stored.unpublish_at, stored.destroyed_at) == (
        NOW,
        NOW + timedelta(hours=1),
        NOW,
    )
    assert stored.public_jwk == first.public_jwk


# outbox ----------------------------------------------------------------------------------


def new_message(priority: int = 1, due: timedelta = timedelta(0), **changes: object) -> OutboxMessage:
    fields: dict[str, object] = {
        "kind": "password_reset",
        "recipient": "someone@example.com",
        "recipient_h": ids.b64url(secrets.token_bytes(32)),
        "locale": "en",
        "params": {"minutes": 20},
        "priority": priority,
        "next_attempt_at": NOW + due,
        "created_at": NOW,
        "not_after": NOW + timedelta(hours=1),
        "sealed_params": b"sealed",
    }
    fields.update(changes)
    return OutboxMessage(**fields)  # type: ignore[arg-type]


async def _clear_outbox(db: SqlDatabase) -> None:
    from sqlalchemy import delete

    from iam_grpc.storage.sql.tables import email_outbox

    async with db.transaction() as tx:
        await tx.connection.execute(delete(email_outbox))  # type: ignore[attr-defined]


async def test_outbox_claims_due_rows_by_priority_and_never_twice(database: SqlDatabase) -> None:
    """Claims take due pending rows, priority 0 first; a claimed row is not claimed again within its lease."""
    await _clear_outbox(database)
    async with database.transaction() as tx:
        notice = await tx.outbox.enqueue(new_message(priority=1))
        code = await tx.outbox.enqueue(new_message(priority=0))
        await tx.outbox.enqueue(new_message(priority=0, due=timedelta(minutes=5)))
    async with database.transaction() as tx:
        claimed = await tx.outbox.claim(NOW, "worker-a", 10, timedelta(seconds=60))
    assert [m.id for m in claimed] == [code, notice]
    assert {m.claimed_by for m in claimed} == {"worker-a"}
    async with database.transaction() as tx:
        assert await tx.outbox.claim(NOW + timedelta(seconds=30), "worker-b", 10, timedelta(seconds=60)) == []
    async with database.transaction() as tx:
        stale = await tx.outbox.claim(NOW + timedelta(seconds=61), "worker-b", 1, timedelta(seconds=60))
    assert [m.id for m in stale] == [code]


async def test_concurrent_claims_split_the_rows(database: SqlDatabase) -> None:
    """Two workers claiming at once never both get the same row."""
    await _clear_outbox(database)
    async with database.transaction() as tx:
        for _ in range(20):
            await tx.outbox.enqueue(new_message())

    async def claim(worker: str) -> list[int]:
        async with database.transaction() as tx:
            return [m.id for m in await tx.outbox.claim(NOW, worker, 20, timedelta(seconds=60)) if m.id]

    first, second = await asyncio.gather(claim("a"), claim("b"))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 20


async def test_outbox_outcomes_wipe_secrets(database: SqlDatabase) -> None:
    """Sent, dead and expired rows lose their sealed secrets; a retry keeps them and reschedules."""
    await _clear_outbox(database)
    async with database.transaction() as tx:
        ids_ = [await tx.outbox.enqueue(new_message()) for _ in range(4)]
    async with database.transaction() as tx:
        await tx.outbox.claim(NOW, "w", 10, timedelta(seconds=60))
        assert not await tx.outbox.mark_sent(ids_[0], "someone-else", NOW, "x")
        assert await tx.outbox.mark_sent(ids_[0], "w", NOW, "<id@example>")
        assert await tx.outbox.mark_failed(
            ids_[1], "w", "421 try later", retry_at=NOW + timedelta(seconds=30), now=NOW
        )
        assert await tx.outbox.mark_failed(ids_[2], "w", "550 no such user", retry_at=None, now=NOW)
        assert await tx.outbox.mark_expired(ids_[3], "w")
        rows = [await tx.outbox.get(i) for i in ids_]
        dead = await tx.outbox.list("dead")
    sent, retry, gone, expired = rows
    assert sent is not None
    assert (sent.status, sent.sealed_params, sent.provider_message_id, sent.attempts) == (
        "sent",
        None,
        "<id@example>",
        1,
    )
    assert retry is not None
    assert (retry.status, retry.attempts, retry.claimed_by, retry.sealed_params) == (
        "pending",
        1,
        None,
        b"sealed",
    )
    assert retry.next_attempt_at == NOW + timedelta(seconds=30)
    assert gone is not None
    assert (gone.status, gone.sealed_params, gone.last_error) == ("dead", None, "550 no such user")
    assert expired is not None
    assert (expired.status, expired.sealed_params) == ("expired", None)
    assert [m.id for m in dead] == [ids_[2]]


async def test_outbox_dedupe_keeps_one_notice_and_the_transaction(database: SqlDatabase) -> None:
    """A second notice with a taken dedupe key is skipped (None) while the rest of its transaction commits."""
    key = "new_device:" + secrets.token_hex(8)
    async with database.transaction() as tx:
        first = await tx.outbox.enqueue(new_message(dedupe_key=key))
    device = new_device()
    async with database.transaction() as tx:
        again = await tx.outbox.enqueue(new_message(dedupe_key=key))
        await tx.devices.insert(device)
    assert first is not None
    assert again is None
    async with database.transaction() as tx:
        assert await tx.devices.get(device.id) is not None


async def test_outbox_release_and_operator_retry(database: SqlDatabase) -> None:
    """Claims are released at shutdown; a dead notice (no secrets) can be retried before its deadline."""
    await _clear_outbox(database)
    async with database.transaction() as tx:
        notice = await tx.outbox.enqueue(new_message(kind="password_changed", sealed_params=None))
        code = await tx.outbox.enqueue(new_message(kind="mfa_code"))
        assert notice is not None
        assert code is not None
        await tx.outbox.claim(NOW, "w", 10, timedelta(seconds=60))
        assert await tx.outbox.release("w") == 2
        await tx.outbox.claim(NOW, "w", 10, timedelta(seconds=60))
        await tx.outbox.mark_failed(notice, "w", "550", retry_at=None, now=NOW)
        await tx.outbox.mark_failed(code, "w", "550", retry_at=None, now=NOW)
        assert await tx.outbox.retry(notice, NOW)
        assert not await tx.outbox.retry(code, NOW)  # its code was wiped: nothing to resend
        revived = await tx.outbox.get(notice)
    assert revived is not None
    assert (revived.status, revived.attempts) == ("pending", 0)


# audit ------------------------------------------------------------------------------------


async def test_audit_events_are_appended_and_filtered(database: SqlDatabase) -> None:
    """Events read back newest first, filtered by user and type prefix; a rolled-back event never lands."""
    user_id = ids.new_ulid(NOW)
    async with database.transaction() as tx:
        await tx.audit.append(
            AuditEvent(NOW, "login.success", "ok", {"n": 1}, user_id=user_id, ip="192.0.2.1")
        )
        await tx.audit.append(AuditEvent(NOW, "login.failure", "fail", {"n": 2}, user_id=user_id))
        await tx.audit.append(
            AuditEvent(NOW, "user.signup", "ok", {}, user_id=user_id, request_id="r-12345678")
        )
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            await tx.audit.append(AuditEvent(NOW, "login.success", "ok", {"n": 3}, user_id=user_id))
            raise RuntimeError("roll back")
    async with database.transaction() as tx:
        logins = await tx.audit.recent(user_id=user_id, type_prefix="login.")
        everything = await tx.audit.recent(user_id=user_id)
    assert [e.details["n"] for e in logins] == [2, 1]
    assert [e.type for e in everything] == ["user.signup", "login.failure", "login.success"]
    assert everything[0].request_id == "r-12345678"


# locks and health ------------------------------------------------------------------------------


async def test_named_lock_is_exclusive(database: SqlDatabase) -> None:
    """While one holder has a named lock, another cannot take it."""
    name = "test:" + secrets.token_hex(4)
    async with database.named_lock(name, timedelta(seconds=5)) as held:
        assert held
        async with database.named_lock(name, timedelta(0)) as second:
            assert not second
    async with database.named_lock(name, timedelta(seconds=1)) as again:
        assert again


async def test_ping_answers_while_the_database_does(database: SqlDatabase, tmp_path: Path) -> None:
    """A reachable database answers ping; one that cannot be reached (a refused port, a file that
    cannot be opened) raises BackendUnavailable: ping is a real round trip, not a no-op."""
    assert await database.ping() is None
    dead_url = (
        "mysql+asyncmy://root@127.0.0.1:1/none"
        if database.dialect == "mysql"
        else f"sqlite+aiosqlite:///{tmp_path}"  # a directory is not a database file
    )
    dead = SqlDatabase.from_url(dead_url, connect_timeout=timedelta(seconds=2))
    try:
        with pytest.raises(BackendUnavailable):
            await dead.ping()
    finally:
        await dead.close()


async def test_after_commit_callbacks_run_only_after_a_commit(database: SqlDatabase) -> None:
    """Callbacks registered in a transaction run once it commits, and never after a rollback."""
    ran: list[str] = []
    async with database.transaction() as tx:
        tx.after_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            tx.after_commit(lambda: ran.append("rolled back"))
            raise RuntimeError("roll back")
    assert ran == ["committed"]


async def test_primary_key_conflicts_are_named_alike_on_every_engine(database: SqlDatabase) -> None:
    """A duplicate primary key is Conflict('<table>.primary') on SQLite and MySQL alike."""
    device = new_device()
    async with database.transaction() as tx:
        await tx.devices.insert(device)
    with pytest.raises(Conflict) as caught:
        async with database.transaction() as tx:
            await tx.devices.insert(device)
    assert caught.value.constraint == "devices.primary"


async def test_reads_inside_a_transaction_are_part_of_it(database: SqlDatabase) -> None:
    """A transaction that only read so far is already open (SQLite's driver would otherwise defer BEGIN)."""
    async with database.transaction() as tx:
        await tx.users.get("0" * 26)
        connection = tx.connection
        # SQLite runs on an inline (synchronous) connection, MySQL on SQLAlchemy's async one
        raw = connection.sync if isinstance(connection, InlineConnection) else connection.sync_connection
        assert raw is not None
        assert raw.in_transaction()
        if database.dialect == "sqlite":
            assert raw.connection.driver_connection.in_transaction  # type: ignore[union-attr]


async def test_concurrent_role_creation_does_not_collide(database: SqlDatabase) -> None:
    """Replicas starting together each ensure the default roles; none fails."""
    name = "race-" + secrets.token_hex(3)

    async def ensure() -> None:
        async with database.transaction() as tx:
            await tx.users.ensure_roles([name, "user"], NOW)

    await asyncio.gather(*(ensure() for _ in range(8)))
    user = new_user()
    async with database.transaction() as tx:
        await tx.users.insert(user)
        assert await tx.users.grant_role(user.id, name, "cli", NOW)


async def test_many_open_transactions_never_wait_for_a_connection(database: SqlDatabase) -> None:
    """18 read transactions open at once: more than SQLite's pool would otherwise hold (5 + 10
    overflow) and within MySQL's (10 + 10). None waits: on SQLite a wait would block the event loop
    that alone can give a connection back."""

    async def reader(ready: asyncio.Event, hold: asyncio.Event) -> None:
        async with database.transaction(read_only=True) as tx:
            await tx.users.get("0" * 26)
            ready.set()
            await hold.wait()

    hold = asyncio.Event()
    readies = [asyncio.Event() for _ in range(18)]
    tasks = [asyncio.create_task(reader(ready, hold)) for ready in readies]
    try:
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 10)
    finally:
        hold.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert all(task.exception() is None for task in tasks)


async def test_a_transaction_cancelled_in_the_middle_of_a_statement_leaves_nothing_that_hangs(
    database: SqlDatabase,
) -> None:
    """A task cancelled while its statement waits for the server (a service stopping in the middle
    of a background poll): the cancellation comes through at once, the write before it is rolled
    back, and the connection is not reused out of step with the server (SQLAlchemy invalidates a
    connection whose statement an exit exception interrupted; a ROLLBACK on it would wait for
    bytes that never come). Every connection comes back to the pool."""
    user = new_user()
    started = asyncio.Event()
    # MySQL: a statement that waits on the server. SQLite's statements run inline on the loop, so
    # there the cancellation lands between statements, the one other place it can.
    slow = "SELECT SLEEP(3)" if database.dialect == "mysql" else None

    async def writer() -> None:
        async with database.transaction() as tx:
            await tx.users.insert(user)
            started.set()
            if slow is not None:
                await tx.connection.execute(text(slow))
            await asyncio.sleep(30)

    task = asyncio.create_task(writer())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.2)  # the SLEEP is on the server
    task.cancel()
    async with asyncio.timeout(2):  # well before the SLEEP ends: nothing waits for its answer
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(25):  # more than the pool holds: a leaked connection would show
        async with asyncio.timeout(5), database.transaction(read_only=True) as tx:
            assert await tx.users.get(user.id) is None
    async with asyncio.timeout(5), database.transaction() as tx:  # and writers go on
        await tx.users.insert(replace(user, id=ids.new_ulid(NOW)))
    pool = database.engine.pool
    if database.dialect == "mysql":
        assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_commit_leaves_no_transaction_behind(tmp_path: Path) -> None:
    """The inline SQLite connection (embedded mode): when COMMIT itself fails, the caller gets an
    error, nothing is written, and the pooled connection comes back clean (not still inside the
    transaction holding the write lock, which would stop every later writer)."""
    db = SqlDatabase.from_url(f"sqlite+aiosqlite:///{tmp_path / 'commit.db'}")
    await migrate.upgrade(db.engine)
    try:
        with pytest.raises(IntegrityError):
            async with db.transaction() as tx:
                # A foreign key checked only at COMMIT: the role of a user that does not exist.
                await tx.connection.execute(text("PRAGMA defer_foreign_keys=ON"))
                await tx.connection.execute(
                    text(
                        "INSERT INTO user_roles (user_id, role_id, granted_at, granted_by) VALUES (:u, 1, :t, 't')"
                    ),
                    {"u": "0" * 26, "t": NOW},
                )
        user = new_user()
        async with db.transaction() as tx:  # the next writer gets the lock at once
            await tx.users.insert(user)
        async with db.transaction(read_only=True) as tx:
            assert await tx.users.get(user.id) == user
            rows = await tx.connection.execute(text("SELECT count(*) FROM user_roles"))
            assert rows.scalar() == 0
    finally:
        await db.close()


async def test_revocations_are_recorded_found_and_purged(database: SqlDatabase) -> None:
    """A revoked jti or kid is found until its expiry (a repeat keeps one row with the later expiry,
    and rolls back with its transaction); active() lists what the deny-list must hold; the cleanup
    purge removes only expired rows."""
    jti, other, kid = ids.new_jti(), ids.new_jti(), "k" * 64  # the longest kid the column takes
    async with database.transaction() as tx:
        await tx.revocations.add("jti", [jti, jti], NOW, NOW + timedelta(minutes=1))
        await tx.revocations.add("kid", [kid], NOW, NOW + timedelta(minutes=16))
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            await tx.revocations.add("jti", [other], NOW, NOW + timedelta(minutes=1))
            raise RuntimeError("rolled back")
    async with database.transaction() as tx:
        await tx.revocations.add("jti", [jti], NOW, NOW + timedelta(minutes=10))  # again, later
    async with database.transaction(read_only=True) as tx:
        later = NOW + timedelta(minutes=5)
        assert await tx.revocations.find([("jti", jti), ("jti", other), ("kid", kid)], later) == {
            ("jti", jti),
            ("kid", kid),
        }
        assert await tx.revocations.find([("kid", jti)], later) == set()  # kinds never mix
        assert await tx.revocations.find([], later) == set()
        active = await tx.revocations.active(NOW + timedelta(minutes=12))
    assert ("kid", kid) in active
    assert ("jti", jti) not in active  # expired by then
    async with database.transaction() as tx:
        purged = await tx.maintenance.purge_revocations(NOW + timedelta(minutes=12), 1000)
    assert purged >= 1
    async with database.transaction(read_only=True) as tx:
        assert await tx.revocations.find([("jti", jti)], NOW) == set()
        assert await tx.revocations.find([("kid", kid)], NOW) == {("kid", kid)}
