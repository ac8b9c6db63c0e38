"""Revocation deny-lists (behaviour.md 1.2): ``{deny}:sid:<sid>`` for ended sessions,
``{deny}:jti:<jti>`` for single access tokens and ``{deny}:kid:<kid>`` for withdrawn signing keys,
in the ephemeral store, so revocations apply on every replica at once. They and their generation
marker share one hash tag (:data:`~iam_grpc.storage.ports.DENY_TAG`): one slot, so a check is one
MGET on a Redis Cluster too, and whatever loses entries loses or changes their marker with them.

SQL is the authority for all three: a session revocation commits ``sessions.revoked_at``, a token
or key revocation a row of ``revocations`` (in the transaction of the change), and only then are
the entries written. The entries are a cache guarded by a generation marker
(:mod:`~iam_grpc.core.tokens.revocation_cache`): while the cache cannot be trusted (the store is
down, restarted, flushed, failed over, or a write failed) every check reads SQL instead, session,
token and key alike, so a revoked token is refused through any store event.
``tokens.denylist_fallback = "closed"`` answers UNAVAILABLE instead of reading SQL.

With a change feed (Redis), each worker answers checks from an in-memory copy
(:mod:`~iam_grpc.core.tokens.denylist_mirror`) while it is current (``tokens.denylist_staleness``),
and per call as above (or refuses: ``tokens.denylist_stale``) while it is not. A revocation's call
answers only after that bound, so once it has answered no replica accepts the token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Literal, Self

from iam_grpc.clock import Clock
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.core.tokens.denylist_mirror import DenyFeed, DenyMirror
from iam_grpc.core.tokens.revocation_cache import GENERATION_KEY, RevocationCache
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import DENY_TAG, Database, Ephemeral, Transaction

__all__ = ["DenyList"]

log = component_logger("iam.denylist")
_WARN_EVERY = 10.0
_MARK = b"1"


def sid_key(session_id: str) -> str:
    return f"{DENY_TAG}:sid:{session_id}"


def jti_key(jti: str) -> str:
    return f"{DENY_TAG}:jti:{jti}"


def kid_key(kid: str) -> str:
    return f"{DENY_TAG}:kid:{kid}"


def pat_key(secret_hash: str) -> str:
    """A personal API token's secret (by its keyed hash) revoked or rotated away."""
    return f"{DENY_TAG}:pat:{secret_hash}"


_KEY_OF = {"jti": jti_key, "kid": kid_key, "pat": pat_key}


class DenyList:
    def __init__(
        self,
        ephemeral: Ephemeral,
        db: Database,
        clock: Clock,
        metrics: CoreMetrics,
        *,
        access_ttl: timedelta,
        leeway: timedelta,
        fallback: Literal["sql", "closed"] = "sql",
        server_id: Callable[[], str] | None = None,
        feed: DenyFeed | None = None,
        staleness: timedelta = timedelta(seconds=1),
        stale: Literal["per_call", "refuse"] = "per_call",
    ) -> None:
        self._ephemeral = ephemeral
        self._db = db
        self._clock = clock
        self._metrics = metrics
        self._memory = access_ttl + leeway  # how long a revoked session's access tokens could still verify
        self._ttl = self._memory + timedelta(seconds=60)
        self._fallback = fallback
        self._last_warning = 0.0
        self.cache = RevocationCache(
            ephemeral,
            self.entries_from_sql,
            entry_ttl=self._ttl,
            server_id=server_id or (lambda: ""),
            on_rebuilt=lambda _count: metrics.denylist_rebuilds.inc(),
        )
        self._feed = feed if staleness > timedelta(0) else None
        self._stale = stale
        self.mirror: DenyMirror | None = None
        if self._feed is not None:
            cache = self.cache
            self.mirror = mirror = DenyMirror(
                self._feed,
                self.entries_from_sql,
                lambda: cache.trusted,
                complete=cache.complete,
                marker_key=GENERATION_KEY,
                staleness=staleness,
                entry_ttl=self._ttl,
            )
            cache.listeners.append(lambda trusted: None if trusted else mirror.lost())

    @property
    def memory(self) -> timedelta:
        """How long a revocation must be remembered: an access token's lifetime plus leeway."""
        return self._memory

    # recording (SQL, inside the transaction of the change) ----------------------------------

    async def record_tokens(self, tx: Transaction, jtis: Sequence[str]) -> None:
        """Record single access tokens as revoked, in ``tx``: the authority the cache follows."""
        now = self._clock.now()
        await tx.revocations.add("jti", jtis, now, now + self._memory)

    async def record_api_secrets(self, tx: Transaction, secret_hashes: Sequence[str]) -> None:
        """Record API-token secrets (keyed hashes) as dead, in ``tx``: remembered as long as a
        replica may hold a verification of them in memory (:attr:`memory`)."""
        now = self._clock.now()
        await tx.revocations.add("pat", secret_hashes, now, now + self._memory)

    async def revoke_api_secrets(self, secret_hashes: Iterable[str]) -> bool:
        """Write entries for secrets recorded with :meth:`record_api_secrets` (after the commit)."""
        return await self._write([(pat_key(h), _MARK) for h in secret_hashes])

    async def api_secret_dead(self, secret_hash: str) -> bool | None:
        """Whether an API-token secret is on the deny-list: one round trip while the cache is
        trusted, none while this worker's copy is current; None when neither can answer (the
        caller reads the token's row instead)."""
        mirror = self.mirror
        if mirror is not None and mirror.current():
            return mirror.holds(pat_key(secret_hash))
        cache = self.cache
        if not cache.trusted:
            return None
        epoch = cache.epoch
        try:
            found = await self._ephemeral.get_many([pat_key(secret_hash), GENERATION_KEY])
        except BackendUnavailable:
            return None
        if cache.accept(found[-1]) and cache.epoch == epoch:
            return found[0] is not None
        return None

    # caching (after the commit) ------------------------------------------------------------

    async def revoke_sessions(self, session_ids: Iterable[str], *, wait: bool = True) -> bool:
        """Write entries for sessions already revoked in SQL (call after the commit). ``wait=False``
        answers before every worker's copy has them (within the staleness bound): for sessions
        a new sign-in evicted, whose owner is not the caller."""
        return await self._write([(sid_key(s), _MARK) for s in session_ids], wait=wait)

    async def revoke_tokens(self, jtis: Iterable[str]) -> bool:
        """Write entries for tokens recorded with :meth:`record_tokens` (after the commit)."""
        return await self._write([(jti_key(j), _MARK) for j in jtis])

    async def revoke_key(self, kid: str) -> bool:
        """An emergency key withdrawal: every replica refuses the key's tokens at once, before its
        next key-table reload."""
        return await self._write([(kid_key(kid), _MARK)])

    async def _write(self, entries: list[tuple[str, bytes]], *, wait: bool = True) -> bool:
        """True when cached; the revocation's call answers only after this returns.

        SQL already holds the revocation. When the store does not take the entries, this waits
        (at most the marker's lease) until it does, or refuses connections, or the lease has run
        out: in the last two cases no replica can trust the cache again before it is rebuilt
        from SQL (the marker is gone, or the store is another or empty). Should the entries still
        be missing, this replica also drops the marker as soon as the store answers, and the
        cache is rebuilt with them (a replica cut off from Redis alone)."""
        if not entries:
            return True
        keys = [key for key, _ in entries]
        if self.mirror is not None:
            self.mirror.add(keys)  # this worker refuses them at once
        started = time.monotonic()
        stored = await self._store(entries)
        done = stored and await self._publish(keys)
        if self.mirror is not None and wait:
            if not done:  # the copies that could read since the write began go stale or see it lost
                await asyncio.sleep(max(0.0, self.mirror.staleness - (time.monotonic() - started)))
                return False
            # The revocation's call answers once no worker's copy can accept the tokens: a copy is
            # current only while its last read of the feed started within the bound, so after it
            # every current copy has read past this change, or (the store failed) has seen the
            # cache lost or a new server, or has gone stale and reads per call.
            await asyncio.sleep(self.mirror.staleness)
        return done

    async def _publish(self, keys: list[str]) -> bool:
        if self._feed is None:
            return True
        try:
            await self._feed.publish(keys, within=self.cache.lease + timedelta(milliseconds=100))
            return True
        except BackendUnavailable:
            # the other workers' copies miss it: drop the marker, so they reload from SQL
            log.bind(entries=len(keys)).warning(
                "deny-list change not published; the cache is rebuilt from SQL"
            )
            self.cache.lost("feed write failed", force=True)
            return False

    async def _store(self, entries: list[tuple[str, bytes]]) -> bool:
        started = time.monotonic()
        try:
            await self._ephemeral.set_many(entries, self._ttl)
            return True
        except BackendUnavailable:
            self.cache.lost("write failed")
        # the lease counts from the first try: a stall longer than it has expired the marker
        spent = timedelta(seconds=time.monotonic() - started)
        wait = max(timedelta(0), self.cache.lease + timedelta(milliseconds=100) - spent)
        if await self._ephemeral.set_many_waiting(entries, self._ttl, within=wait):
            return True
        log.bind(entries=len(entries)).warning("deny-list entries not written; the cache is rebuilt from SQL")
        self.cache.lost("write failed", force=True)
        return False

    # checking ----------------------------------------------------------------------------

    async def check(
        self, session_id: str, jti: str, kid: str = ""
    ) -> Literal["session", "token", "key"] | None:
        """Which deny-list holds the token: this worker's copy while it is current, else one round
        trip to the shared cache while it is trusted, SQL otherwise."""
        mirror = self.mirror
        if mirror is not None:
            if mirror.current():
                if kid and mirror.holds(kid_key(kid)):
                    return "key"
                if mirror.holds(sid_key(session_id)):
                    return "session"
                if mirror.holds(jti_key(jti)):
                    return "token"
                return None
            if self._stale == "refuse":
                raise BackendUnavailable()
        cache = self.cache
        if cache.trusted:
            epoch = cache.epoch
            keys = [sid_key(session_id), jti_key(jti), kid_key(kid) if kid else "", GENERATION_KEY]
            try:
                found = await self._ephemeral.get_many([k for k in keys if k])
            except BackendUnavailable:
                pass  # this check reads SQL; the marker tells whether anything was lost
            else:
                if cache.accept(found[-1]) and cache.epoch == epoch:
                    if kid and found[2] is not None:
                        return "key"
                    if found[0] is not None:
                        return "session"
                    if found[1] is not None:
                        return "token"
                    return None
        return await self._from_sql(session_id, jti, kid)

    async def _from_sql(
        self, session_id: str, jti: str, kid: str
    ) -> Literal["session", "token", "key"] | None:
        if self._fallback == "closed":
            raise BackendUnavailable()
        self._metrics.denylist_fallbacks.inc()
        now_mono = time.monotonic()
        if now_mono - self._last_warning > _WARN_EVERY:
            self._last_warning = now_mono
            log.bind(reason=self.cache.reason).warning(
                "deny-list cache not trusted; reading revocations from SQL"
            )
        wanted = [("jti", jti)] + ([("kid", kid)] if kid else [])
        async with self._db.transaction(read_only=True) as tx:
            session = await tx.sessions.get(session_id)
            revoked = await tx.revocations.find(wanted, self._clock.now())
        if ("kid", kid) in revoked:
            return "key"
        if session is None or session.revoked_at is not None:
            return "session"
        if ("jti", jti) in revoked:
            return "token"
        return None

    # rebuilding ------------------------------------------------------------------------------

    async def entries_from_sql(self) -> list[tuple[str, bytes]]:
        """Every entry the cache must hold: sessions revoked within an access token's lifetime,
        token and key revocations not yet expired, and keys withdrawn within that lifetime."""
        now = self._clock.now()
        since = now - self._memory
        async with self._db.transaction(read_only=True) as tx:
            sessions = await tx.sessions.revoked_since(since)
            recorded = await tx.revocations.active(now)
            withdrawn = [
                row.kid
                for row in await tx.keys.all()
                if row.unpublish_at is not None and since <= row.unpublish_at <= now
            ]
        entries = [(sid_key(s), _MARK) for s in sessions]
        entries += [(_KEY_OF[kind](value), _MARK) for kind, value in recorded if kind in _KEY_OF]
        entries += [(kid_key(kid), _MARK) for kid in withdrawn]
        return entries

    async def start(self) -> None:
        """At startup, before serving: trust the cache (verified or rebuilt) and rewrite its
        entries. With the store down this only logs; checks read SQL and recovery goes on."""
        try:
            if not await self.cache.recover():
                self.cache.lost("not verified at startup")
                return
            await self.cache.refresh()
            if self.mirror is not None:
                await self.mirror.reload()  # the full list, before the worker serves
        except BackendUnavailable:
            self.cache.lost("store failed at startup")
            log.warning("deny-list not verified at startup; reading SQL until the store answers")
        finally:
            if self.mirror is not None:
                self.mirror.start()

    async def replay(self) -> int:
        """The periodic replay (``tokens.denylist_replay``): rewrite the entries from SQL."""
        return await self.cache.refresh()

    async def close(self) -> None:
        if self.mirror is not None:
            await self.mirror.close()
        await self.cache.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
