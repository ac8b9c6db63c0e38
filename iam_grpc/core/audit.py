"""Audit events (behaviour.md 9.6): written to ``audit_events`` in the same
transaction as the change they describe, and to the audit log sink once that
transaction has committed, so a rollback leaves no trace in either. The audit
rows that are also stream events (``core/events.py``) write their event rows
in that transaction too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, Self

from iam_grpc.clock import Clock
from iam_grpc.core.call import current_call
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.events import FROM_AUDIT, event_data
from iam_grpc.logging import AUDIT, component_logger
from iam_grpc.storage.ports import Database, Transaction
from iam_grpc.storage.records import AuditEvent, UserDevice

__all__ = ["AuditTrail"]

log = component_logger("iam.audit").bind(kind=AUDIT)


class AuditTrail:
    def __init__(
        self, db: Database, clock: Clock, material: SecretMaterial, *, caller: str | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._material = material
        self._pending: set[asyncio.Task[None]] = set()
        self._caller = caller  # fixed caller for events outside RPCs (e.g. "cli")
        self._listeners: list[Callable[[AuditEvent], None]] = []

    def listen(self, listener: Callable[[AuditEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with every event once its transaction has committed (in commit
        order, in the event loop); returns the function that stops it. For
        :func:`iam_grpc.testing.capture_audit`: a listener must not raise or block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def event(
        self,
        type: str,
        outcome: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        device_id: str | None = None,
        ip: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditEvent:
        call = current_call()
        return AuditEvent(
            occurred_at=self._clock.now(),
            type=type,
            outcome=outcome,
            details=dict(details or {}),
            user_id=user_id,
            session_id=session_id,
            device_id=device_id,
            ip=ip if ip is not None else (call.client_ip if call else None),
            caller=self._caller or (call.caller.id if call and call.caller else None),
            request_id=call.request_id if call else None,
        )

    def record_soon(self, event: AuditEvent) -> None:
        """Record in a transaction of its own, in the background.

        For events raised while the caller may hold a transaction (a rate-limit
        block inside a flow): a second transaction in the same task would wait on
        SQLite's write lock held by the first.
        """
        task = asyncio.get_running_loop().create_task(self._record_quietly(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_quietly(self, event: AuditEvent) -> None:
        try:
            await self.record(event)
        except Exception:
            log.bind(type=event.type).exception("could not record an audit event")

    async def drain(self) -> None:
        """Wait for background records (shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    async def sessions_revoked(
        self, tx: Transaction, user_id: str, session_ids: list[str], reason: str
    ) -> None:
        """One ``session.revoked`` event per session ended by a credential change (9.6)."""
        for session_id in session_ids:
            await self.record(
                self.event(
                    "session.revoked",
                    "info",
                    user_id=user_id,
                    session_id=session_id,
                    details={"reason": reason},
                ),
                tx,
            )

    async def untrust_devices(
        self,
        tx: Transaction,
        links: list[UserDevice],
        now: datetime,
        reason: str,
        *,
        keep: str | None = None,
    ) -> int:
        """End the trust of every trusted device in ``links`` but ``keep``, each with a
        ``device.untrusted`` event in ``tx`` (behaviour.md 1.7, 9.6). Returns how many."""
        count = 0
        for link in links:
            if link.device_id == keep or link.trusted_at is None or link.trust_revoked_at is not None:
                continue
            await tx.devices.save_link(replace(link, trust_revoked_at=now))
            await self.record(
                self.event(
                    "device.untrusted",
                    "info",
                    user_id=link.user_id,
                    device_id=link.device_id,
                    details={"reason": reason},
                ),
                tx,
            )
            count += 1
        return count

    async def record(self, event: AuditEvent, tx: Transaction | None = None) -> None:
        """Append ``event`` within ``tx`` (or a transaction of its own) and log it after commit."""
        if tx is not None:
            await self._append(event, tx)
            return
        async with self._db.transaction() as own:
            await self._append(event, own)

    async def _append(self, event: AuditEvent, tx: Transaction) -> None:
        await tx.audit.append(event)
        # the events this row also is (core/events.py), in the same transaction
        for kind in FROM_AUDIT.get(event.type, ()):
            await tx.events.append(
                kind,
                event.occurred_at,
                user_id=event.user_id,
                session_id=event.session_id,
                data=event_data(event.details),
            )
        tx.after_commit(lambda: self._emit(event))

    def _emit(self, event: AuditEvent) -> None:
        for listener in self._listeners:
            listener(event)
        log.bind(
            type=event.type,
            outcome=event.outcome,
            user_id=event.user_id,
            session_id=event.session_id,
            device_h=self._material.log_hash(event.device_id) if event.device_id else None,
            ip=event.ip,
            caller=event.caller,
            details=event.details,
            **({"request_id": event.request_id} if event.request_id else {}),
        ).info("audit event")
