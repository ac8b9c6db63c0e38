"""Whether the deny-list held in the ephemeral store may be trusted, and its rebuild from SQL.

SQL is the authority for every revocation (``sessions.revoked_at`` and the ``revocations``
table); the ephemeral store only caches it so a token check costs no SQL. A cache can lose data
without anyone writing a revocation: Redis restarts empty or from an old snapshot, fails over to a
replica that missed the last writes, is flushed, or a write of ours failed. A revoked token must
never verify because of that, so the cache carries a **generation marker** (``{deny}:gen``) that
only a complete rebuild writes, and every token check reads it in the same round trip as its
entries:

- ``ok:<server>:<nonce>``: complete for the Redis server whose run_id is ``<server>`` (on a Redis
  Cluster, the primary serving the marker's slot, which holds every entry too);
- ``rb:<nonce>``: a replica is rebuilding it (the claim expires if that replica dies);
- missing: lost (restart, flush, or the end of its lease).

The valid marker is a **lease**: it lives :data:`LEASE` (3 s) and every trusted replica extends
it every 0.5 s. A Redis that stops answering for longer than the lease (SIGSTOP, a
stalled host or network) therefore comes back without a marker, and every replica rebuilds before
trusting it again, even one that saw nothing of the stall. A revocation whose entry could not be
written meanwhile is in that rebuild, as SQL has it. A stall shorter than the lease is covered by
the writer: a revocation's call does not answer before its entries are in the store, or the store
refuses connections (it comes back empty or as another server), or the lease has run out
(:meth:`~iam_grpc.core.tokens.denylist.DenyList` waits at most that long).

A replica trusts the cache only while it has seen a valid marker for the server it is connected
to. A missing or foreign marker, a failed write of its own, or a new server run_id makes it
**untrusted**: checks read SQL at once, and a recovery task starts immediately, not at the next
periodic replay. A failed read is no sign of lost data: that one check reads SQL, nothing more
(so a slow answer under load does not send every check to SQL). Recovery trusts an intact
marker again, or claims the marker and rebuilds every entry from SQL, then writes a new marker
with a compare-and-set that fails if anyone invalidated the cache meanwhile (it then starts
over). A replica whose own write still failed after waiting deletes the marker first, so every
replica reads SQL until the rebuild that includes that revocation is done.

A replica that finds itself on another server (:meth:`RevocationCache.server_changed`) deletes
the marker too: until it noticed, it may have written entries to the old server, which a
failover leaves answering for a while (Sentinel reconfigures an old master seconds later; a
Cluster primary cut off from the majority takes writes until its node timeout), and another
replica may already have rebuilt the new server's cache without them.

A later per-worker in-memory copy can layer on this: it follows :attr:`listeners` (trust
changes) and the marker, and loads the same entries (the ``load`` callable) before it serves.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from iam_grpc.background import end_tasks
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import DENY_TAG, Ephemeral

__all__ = ["GENERATION_KEY", "RevocationCache"]

log = component_logger("iam.denylist")

GENERATION_KEY = f"{DENY_TAG}:gen"  # in the entries' slot: lost or changed with them
_VALID = b"ok:"
_BUILDING = b"rb:"
LEASE = timedelta(seconds=3)  # how long a valid marker lives unless a trusted replica extends it
_CLAIM_TTL = timedelta(seconds=15)  # a rebuilder that died mid-way frees the claim after this
_FIRST_PAUSE = 0.05
_MAX_PAUSE = 1.0
_STOP_GRACE = 5.0  # seconds a cancelled recovery or lease extension may take to end


class RevocationCache:
    def __init__(
        self,
        ephemeral: Ephemeral,
        load: Callable[[], Awaitable[Sequence[tuple[str, bytes]]]],
        *,
        entry_ttl: timedelta,
        lease: timedelta = LEASE,
        server_id: Callable[[], str] = lambda: "",
        on_rebuilt: Callable[[int], None] | None = None,
    ) -> None:
        self._ephemeral = ephemeral
        self._load = load
        self._entry_ttl = entry_ttl
        self._lease = lease
        self._marker = b""  # the valid marker this replica last verified or wrote
        self._server_id = server_id
        self._on_rebuilt = on_rebuilt
        self._trusted = False  # nothing is trusted before the first verification or rebuild
        self._force = False  # a write of ours failed: invalidate for everyone before rebuilding
        self._epoch = 0  # bumped at each loss, so a recovery that raced one does not trust
        self._task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self.reason = "not verified yet"
        self.rebuilds = 0
        self.listeners: list[Callable[[bool], None]] = []

    @property
    def trusted(self) -> bool:
        return self._trusted

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def lease(self) -> timedelta:
        return self._lease

    # losing trust ----------------------------------------------------------------------------

    def lost(self, reason: str, *, force: bool = False) -> None:
        """The cache may lack entries: read SQL until it is verified or rebuilt (starts now)."""
        self._epoch += 1
        if force:
            self._force = True
        if self._trusted:
            self._trusted = False
            self.reason = reason
            log.bind(reason=reason).warning("deny-list cache untrusted; reading revocations from SQL")
            self._notify()
        self._recover_soon()

    def server_changed(self) -> None:
        """The store now answers from another server (a restart or a failover): untrusted, and the
        marker is invalidated for every replica before the rebuild, since entries this replica
        wrote before it noticed may have gone to the old server only."""
        self.lost("store server changed", force=True)

    def complete(self, marker: bytes | None) -> bool:
        """Whether ``marker`` says the cache is complete for the server this replica is on."""
        return marker is not None and marker.startswith(_VALID) and _server_of(marker) == self._server_id()

    def accept(self, marker: bytes | None) -> bool:
        """Judge the marker read with a check's entries: True when the entries may be trusted."""
        if marker is None:
            self.lost("generation marker missing")
            return False
        if not marker.startswith(_VALID):
            self.lost("deny-list being rebuilt")
            return False
        return self._trusted

    # recovering -----------------------------------------------------------------------------

    def _recover_soon(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._recover_loop(), name="deny-list-recovery")

    async def _recover_loop(self) -> None:
        pause = _FIRST_PAUSE
        while not self._trusted:
            try:
                if await self.recover():
                    return
            except BackendUnavailable:
                pass
            except Exception:
                log.exception("deny-list recovery failed unexpectedly")
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)

    async def recover(self) -> bool:
        """One recovery attempt: True once the cache is trusted. Raises BackendUnavailable."""
        epoch = self._epoch
        if self._force:
            self._force = False
            try:
                await self._ephemeral.delete(GENERATION_KEY)  # every replica reads SQL from now
            except BackendUnavailable:
                self._force = True
                raise
        marker = await self._ephemeral.get(GENERATION_KEY)
        server = self._server_id()
        if marker is not None and marker.startswith(_VALID) and _server_of(marker) == server:
            return self._trust(epoch, "verified", marker)  # intact, or rebuilt by another replica
        if marker is not None and marker.startswith(_BUILDING):
            return False  # another replica is rebuilding: wait for its marker (or its claim's end)
        claim = _BUILDING + secrets.token_hex(8).encode()
        if marker is None:
            claimed = await self._ephemeral.set_if_absent(GENERATION_KEY, claim, _CLAIM_TTL)
        else:  # a marker of another server (a restart from a snapshot, a failover)
            claimed = await self._ephemeral.compare_and_set(GENERATION_KEY, marker, claim, _CLAIM_TTL)
        if not claimed:
            return False
        count = await self._write_all()
        valid = _VALID + f"{server}:{secrets.token_hex(8)}".encode()
        if not await self._ephemeral.compare_and_set(GENERATION_KEY, claim, valid, self._lease):
            return False  # invalidated while rebuilding (a failed write elsewhere): again
        self.rebuilds += 1
        log.bind(entries=count).info("deny-list rebuilt from SQL")
        if self._on_rebuilt is not None:
            self._on_rebuilt(count)
        return self._trust(epoch, "rebuilt", valid)

    def _trust(self, epoch: int, how: str, marker: bytes) -> bool:
        if epoch != self._epoch or self._force:
            return False  # lost again meanwhile: look once more
        self._marker = marker
        if not self._trusted:
            self._trusted = True
            self.reason = how
            log.bind(how=how).info("deny-list cache trusted")
            self._notify()
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.get_running_loop().create_task(
                self._extend_lease(), name="deny-list-lease"
            )
        return True

    async def _extend_lease(self) -> None:
        """While trusted: extend the marker every 0.5 s. A marker gone or replaced by
        something else than a complete one ends the trust; a failed call does not (the marker's
        own end tells every replica if the store stalled for longer than the lease)."""
        pause = min(0.5, self._lease.total_seconds() / 4)
        while True:
            await asyncio.sleep(pause)
            if not self._trusted:
                return
            epoch = self._epoch
            try:
                if await self._ephemeral.extend(GENERATION_KEY, self._marker, self._lease):
                    continue
                marker = await self._ephemeral.get(GENERATION_KEY)
                if (
                    marker is not None
                    and marker.startswith(_VALID)
                    and _server_of(marker) == self._server_id()
                ):
                    self._marker = marker  # rebuilt by another replica since: complete too
                    continue
                if epoch == self._epoch:
                    self.lost("generation marker missing" if marker is None else "generation marker changed")
            except BackendUnavailable:
                continue

    async def _write_all(self) -> int:
        entries = await self._load()
        await self._ephemeral.set_many(entries, self._entry_ttl)
        return len(entries)

    async def refresh(self) -> int:
        """The periodic replay: rewrite every entry from SQL and extend an intact marker (defence
        against entries lost without the marker, such as an eviction). Starts a recovery instead
        when the cache is not trusted or the marker is not intact."""
        if not self._trusted:
            self._recover_soon()
            return 0
        epoch = self._epoch
        marker = await self._ephemeral.get(GENERATION_KEY)
        if marker is None or not marker.startswith(_VALID) or _server_of(marker) != self._server_id():
            self.lost("generation marker missing" if marker is None else "generation marker changed")
            return 0
        count = await self._write_all()
        extended = await self._ephemeral.extend(GENERATION_KEY, marker, self._lease)
        if not extended and epoch == self._epoch:
            self.lost("generation marker changed")
        return count

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self._trusted)

    async def close(self) -> None:
        await end_tasks([self._task, self._lease_task], grace=_STOP_GRACE)
        self._task = self._lease_task = None


def _server_of(marker: bytes) -> str:
    """The server run_id a valid marker was written for."""
    return marker[len(_VALID) :].decode(errors="replace").rpartition(":")[0]
