"""Revocation deny-lists (behaviour.md 1.2): ``deny:sid:{sid}`` for ended
sessions and ``deny:jti:{jti}`` for single access tokens, in the ephemeral
store, so revocations apply on every replica at once.

SQL is the truth for sessions: every revocation commits ``revoked_at`` first,
then writes the marker; a replay job rewrites the markers of recent
revocations, so a flushed or failed-over Redis cannot resurrect a revoked
token for longer than ``tokens.denylist_replay``. When the store fails,
``tokens.denylist_fallback = "sql"`` reads ``sessions.revoked_at`` instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Literal

from iam_grpc.clock import Clock
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.storage.ports import Database, Ephemeral

__all__ = ["DenyList"]

log = component_logger("iam.denylist")
_WARN_EVERY = 10.0


def sid_key(session_id: str) -> str:
    return f"deny:sid:{{{session_id}}}"


def jti_key(jti: str) -> str:
    return f"deny:jti:{{{jti}}}"


def kid_key(kid: str) -> str:
    return f"deny:kid:{{{kid}}}"


class DenyList:
    def __init__(
        self,
        ephemeral: Ephemeral,
        db: Database,
        clock: Clock,
        metrics: Metrics,
        *,
        access_ttl: timedelta,
        leeway: timedelta,
        fallback: Literal["sql", "closed"] = "sql",
    ) -> None:
        self._ephemeral = ephemeral
        self._db = db
        self._clock = clock
        self._metrics = metrics
        self._memory = access_ttl + leeway  # how long a revoked session's access tokens could still verify
        self._ttl = self._memory + timedelta(seconds=60)
        self._fallback = fallback
        self._last_warning = 0.0

    async def revoke_sessions(self, session_ids: Iterable[str]) -> None:
        """Write markers for sessions already revoked in SQL (call after the commit)."""
        for session_id in session_ids:
            try:
                await self._ephemeral.set(sid_key(session_id), b"1", self._ttl)
            except BackendUnavailable:
                # SQL already says revoked; the replay job rewrites the marker when the store is back.
                log.bind(session_id=session_id).warning(
                    "deny-list marker not written; replay will restore it"
                )

    async def revoke_tokens(self, jtis: Iterable[str]) -> None:
        for jti in jtis:
            await self._ephemeral.set(jti_key(jti), b"1", self._ttl)

    async def revoke_key(self, kid: str) -> None:
        """An emergency key withdrawal: every replica refuses the key's tokens at once, before its
        next key-table reload."""
        await self._ephemeral.set(kid_key(kid), b"1", self._ttl)

    async def check(
        self, session_id: str, jti: str, kid: str = ""
    ) -> Literal["session", "token", "key"] | None:
        """Which deny-list holds the token, in one round trip (SQL when the store fails)."""
        try:
            keys = [sid_key(session_id), jti_key(jti)] + ([kid_key(kid)] if kid else [])
            found = await self._ephemeral.exists(keys)
            session_denied, token_denied = found[0], found[1]
            key_denied = len(found) > 2 and found[2]
        except BackendUnavailable:
            if self._fallback == "closed":
                raise
            self._metrics.denylist_fallbacks.inc()
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY:
                self._last_warning = now
                log.warning("deny-list store failed; reading session revocations from SQL")
            async with self._db.transaction(read_only=True) as tx:
                session = await tx.sessions.get(session_id)
            return "session" if session is None or session.revoked_at is not None else None
        if key_denied:
            return "key"
        if session_denied:
            return "session"
        if token_denied:
            return "token"
        return None

    async def replay(self) -> int:
        """Rewrite the markers of sessions revoked within an access token's lifetime."""
        since = self._clock.now() - self._memory
        async with self._db.transaction(read_only=True) as tx:
            ids = await tx.sessions.revoked_since(since)
            withdrawn = [
                row.kid
                for row in await tx.keys.all()
                if row.unpublish_at is not None and since <= row.unpublish_at <= self._clock.now()
            ]
        for session_id in ids:
            await self._ephemeral.set(sid_key(session_id), b"1", self._ttl)
        for kid in withdrawn:
            await self._ephemeral.set(kid_key(kid), b"1", self._ttl)
        return len(ids)
