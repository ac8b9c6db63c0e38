"""The cleanup job (behaviour.md 1.8): every ``cleanup.interval`` (with jitter),
on one replica at a time (ephemeral lock ``cleanup``), in batches of
``cleanup.batch`` rows per statement, so expired rows never pile up."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.clock import Clock
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Database, Ephemeral, Maintenance

__all__ = ["Cleanup", "CleanupPolicy"]

log = component_logger("iam.cleanup")
LOCK_KEY = "lock:{cleanup}"


@dataclass(frozen=True, slots=True)
class CleanupPolicy:
    reuse_memory: timedelta = timedelta(days=7)
    session_memory: timedelta = timedelta(days=30)
    outbox_done: timedelta = timedelta(days=30)
    outbox_dead: timedelta = timedelta(days=90)
    audit_retention: timedelta = timedelta(days=400)
    device_memory: timedelta = timedelta(days=180)
    batch: int = 1000
    max_batches: int = 100  # per table per run: a backlog drains over several runs


class Cleanup:
    def __init__(self, db: Database, ephemeral: Ephemeral, clock: Clock, policy: CleanupPolicy) -> None:
        self._db = db
        self._ephemeral = ephemeral
        self._clock = clock
        self._policy = policy

    async def run(self, *, lock: bool = True) -> dict[str, int]:
        """One pass; skipped (empty result) when another replica holds the lock."""
        mine = secrets.token_bytes(16)  # this pass's own lock value
        if lock and not await self._ephemeral.set_if_absent(LOCK_KEY, mine, timedelta(minutes=9)):
            return {}
        try:
            counts = await self._pass()
        finally:
            if lock:
                # Only while the lock is still ours: a pass that outlived it may find another
                # replica's lock in its place, which must stay (compare-and-delete).
                await self._ephemeral.delete_if(LOCK_KEY, mine)
        if any(counts.values()):
            log.bind(**counts).info("cleanup removed rows")
        return counts

    async def _pass(self) -> dict[str, int]:
        p, now = self._policy, self._clock.now()
        jobs: dict[str, Callable[[Maintenance], Awaitable[int]]] = {
            "refresh_tokens": lambda m: m.purge_refresh_tokens(now - p.reuse_memory, now, p.batch),
            "sessions": lambda m: m.purge_sessions(now - p.session_memory, now, p.batch),
            "outbox": lambda m: m.purge_outbox(now - p.outbox_done, now - p.outbox_dead, p.batch),
            "outbox_secrets": lambda m: m.wipe_outbox_secrets(p.batch),
            "audit_events": lambda m: m.purge_audit(now - p.audit_retention, p.batch),
            "devices": lambda m: m.purge_devices(now - p.device_memory, p.batch),
            "revocations": lambda m: m.purge_revocations(now, p.batch),
        }
        counts: dict[str, int] = {}
        for name, job in jobs.items():
            total = 0
            for _ in range(p.max_batches):
                async with self._db.transaction() as tx:
                    removed = await job(tx.maintenance)
                total += removed
                if removed < p.batch:
                    break
            counts[name] = total
        return counts
