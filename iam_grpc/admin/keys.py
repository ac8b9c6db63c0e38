"""Signing keys (behaviour.md 1.3): their life cycle, and rotation (planned or at once, with an
emergency withdrawal of a key)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from iam_grpc.admin.context import AdminTools
from iam_grpc.admin.errors import NotFound
from iam_grpc.storage.records import SigningKey

__all__ = ["KeyRotated", "KeyView", "list_keys", "rotate_key"]


@dataclass(frozen=True, slots=True)
class KeyView:
    kid: str
    alg: str
    state: str
    publish_at: datetime
    activate_at: datetime
    deactivate_at: datetime | None
    unpublish_at: datetime | None
    private_key: str  # "encrypted", or "destroyed" once retired


@dataclass(frozen=True, slots=True)
class KeyRotated:
    kid: str
    activate_at: datetime
    cached: bool  # a withdrawn key's deny-list entry reached the cache (else: at the next replay)
    reached_service_state: bool


def _state(row: SigningKey, now: datetime) -> str:
    if row.unpublish_at is not None and row.unpublish_at <= now:
        return "unpublished"
    if row.activate_at > now:
        return "published, not signing yet"
    if row.deactivate_at is not None and row.deactivate_at <= now:
        return "retired (verifies until unpublished)"
    return "signing"


async def list_keys(tools: AdminTools) -> list[KeyView]:
    await tools.keys.reload()
    now = tools.clock.now()
    return [
        KeyView(
            kid=row.kid,
            alg=row.alg,
            state=_state(row, now),
            publish_at=row.publish_at,
            activate_at=row.activate_at,
            deactivate_at=row.deactivate_at,
            unpublish_at=row.unpublish_at,
            private_key="destroyed" if row.private_key_enc is None else "encrypted",
        )
        for row in tools.keys.rows()
    ]


async def rotate_key(tools: AdminTools, *, immediate: bool, revoke: str | None) -> KeyRotated:
    """Create the next key: published now, signing after ``keys.publish_ahead`` unless
    ``immediate``; ``revoke`` withdraws that kid at once (its tokens stop verifying)."""
    keys, audit = tools.keys, tools.audit
    await keys.reload()
    if revoke is not None and revoke not in {row.kid for row in keys.rows()}:
        raise NotFound(f"no key {revoke}")
    new = await keys.rotate(immediate=immediate, revoke=revoke)
    cached = await tools.denylist.revoke_key(revoke) if revoke is not None else True
    await audit.record(audit.event("keys.created", "ok", details={"kid": new.kid, "immediate": immediate}))
    # keys.activated: written here when the key signs at once; a planned key starts signing at its
    # activate_at (in keys.created's details and in `keys list`) without a command.
    if immediate:
        await audit.record(audit.event("keys.activated", "ok", details={"kid": new.kid}))
    if revoke is not None:
        await audit.record(audit.event("keys.revoked", "ok", details={"kid": revoke}))
    return KeyRotated(new.kid, new.activate_at, cached, tools.reaches_service_state)
