"""The outbox sender (behaviour.md 7.3): one per process, claiming due rows so
that no two replicas send one message, priority 0 (codes and links) first.

- A row past its send deadline becomes ``expired`` unsent (a code is never
  sent after it stopped working); secrets are wiped.
- Success: ``sent``, secrets wiped. A temporary failure retries on the
  ``mail.retry_backoff`` schedule (with ±20% jitter); after
  ``mail.max_attempts``, or at once on a permanent failure, the row is ``dead``.
- ``mail.max_per_minute`` delays sending when exceeded; it never drops mail.
- Each row is handled on its own: a message that cannot be built (a template
  that fails, an address a header refuses) or that fails in a way nobody
  foresaw is ``dead`` with its reason, and the batch goes on. One poison row
  must never hold back the rest of its batch until their claims lapse.
- Woken at once by a local enqueue, otherwise polls every ``mail.poll_interval``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from email.message import EmailMessage
from typing import Self

from iam_grpc.background import WokenLoop
from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SealError, SecretMaterial
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import (
    Database,
    MailError,
    MailTransport,
    MessageRenderer,
    PermanentMailError,
)
from iam_grpc.storage.records import OutboxMessage

__all__ = ["OutboxSender"]

log = component_logger("iam.mail.sender")
_STOP_GRACE = 15.0  # seconds the message in hand may take at shutdown, then again once cancelled

CLAIM_LEASE = timedelta(seconds=60)


class OutboxSender:
    def __init__(
        self,
        db: Database,
        transport: MailTransport,
        renderer: MessageRenderer,
        material: SecretMaterial,
        clock: Clock,
        metrics: CoreMetrics,
        *,
        batch: int = 20,
        poll_interval: timedelta = timedelta(seconds=2),
        retry_backoff: Sequence[timedelta] = (timedelta(seconds=30),),
        max_attempts: int = 8,
        max_per_minute: int = 600,
    ) -> None:
        self._db = db
        self._transport = transport
        self._renderer = renderer
        self._material = material
        self._clock = clock
        self._metrics = metrics
        self._batch = batch
        self._backoff = list(retry_backoff) or [timedelta(seconds=30)]
        self._max_attempts = max_attempts
        self._max_per_minute = max_per_minute
        self.worker_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        self._loop = WokenLoop("outbox-sender", self._pass, poll_interval.total_seconds(), grace=_STOP_GRACE)
        self._recent: deque[float] = deque()

    def wake(self) -> None:
        self._loop.wake()

    def stopping(self) -> bool:
        return self._loop.stopping

    def start(self) -> None:
        self._loop.start()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Finish the message in hand, stop claiming, and give back unfinished claims."""
        await self._loop.stop()
        try:
            async with self._db.transaction() as tx:
                await tx.outbox.release(self.worker_id)
        except BackendUnavailable:
            log.warning("could not release outbox claims; they lapse by themselves")

    async def _pass(self) -> bool:
        """One batch; True when it was full (more may be due: the next goes at once)."""
        try:
            return await self.send_due() >= self._batch
        except BackendUnavailable:
            log.warning("outbox unavailable; retrying")
            return False

    async def send_due(self) -> int:
        """Claim and handle one batch of due rows; returns how many were handled."""
        async with self._db.transaction() as tx:
            rows = await tx.outbox.claim(self._clock.now(), self.worker_id, self._batch, CLAIM_LEASE)
        for row in rows:
            if self.stopping():
                break
            try:
                await self._deliver(row)
            except BackendUnavailable:
                raise  # the database is gone for every row alike; the claims lapse by themselves
            except Exception as error:
                await self._set_aside(row, error)
        return len(rows)

    async def _set_aside(self, row: OutboxMessage, error: Exception) -> None:
        """A row whose handling failed unexpectedly is dead-lettered, so it is not claimed (and
        does not fail) again and again while the rest of the queue waits."""
        assert row.id is not None
        summary = f"unexpected failure ({type(error).__name__})"
        log.bind(kind=row.kind, recipient_h=row.recipient_h[:12], outbox_id=row.id, error=summary).error(
            "mail could not be handled; dead-lettered"
        )
        async with self._db.transaction() as tx:
            await tx.outbox.mark_failed(row.id, self.worker_id, summary, retry_at=None, now=self._clock.now())
        self._metrics.mail_outcomes.labels("dead").inc()

    async def _smooth(self) -> None:
        """Hold back when more than max_per_minute were sent in the last minute (never drops)."""
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        if len(self._recent) >= self._max_per_minute:
            await asyncio.sleep(60 - (now - self._recent[0]))
        self._recent.append(time.monotonic())

    def _retry_at_delay(self, attempts: int) -> timedelta:
        base = self._backoff[min(attempts, len(self._backoff) - 1)]
        return base * (0.8 + 0.4 * secrets.randbelow(1001) / 1000)

    async def _deliver(self, row: OutboxMessage) -> None:
        assert row.id is not None
        now = self._clock.now()
        kind_h = {"kind": row.kind, "recipient_h": row.recipient_h[:12], "outbox_id": row.id}
        if row.not_after <= now:
            async with self._db.transaction() as tx:
                await tx.outbox.mark_expired(row.id, self.worker_id)
            self._metrics.mail_outcomes.labels("expired").inc()
            log.bind(**kind_h).info("mail expired unsent")
            return
        try:
            email = self._build(row)
            await self._smooth()
            provider_id = await self._transport.send(email)
        except MailError as error:
            attempts = row.attempts + 1
            dead = isinstance(error, PermanentMailError) or attempts >= self._max_attempts
            retry_at = None if dead else now + self._retry_at_delay(row.attempts)
            async with self._db.transaction() as tx:
                await tx.outbox.mark_failed(row.id, self.worker_id, error.summary, retry_at=retry_at, now=now)
            self._metrics.mail_outcomes.labels("dead" if dead else "retry").inc()
            line = log.bind(**kind_h, attempts=attempts, error=error.summary)
            if dead:
                line.error("mail dead-lettered")
            else:
                line.warning("mail send failed; will retry")
            return
        async with self._db.transaction() as tx:
            await tx.outbox.mark_sent(row.id, self.worker_id, self._clock.now(), provider_id[:255])
        self._metrics.mail_outcomes.labels("sent").inc()
        log.bind(**kind_h).info("mail sent")

    def _build(self, row: OutboxMessage) -> EmailMessage:
        """The message, rendered and serialised once; anything that stops that is permanent (the
        same row fails the same way every time), and its reason names no part of the message."""
        try:
            email = self._renderer.render(row, self._open(row))
            email.as_bytes()  # header and body encoding problems surface here, not in the transport
        except MailError:
            raise
        except Exception as error:
            raise PermanentMailError(f"message could not be built ({type(error).__name__})") from None
        return email

    def _open(self, row: OutboxMessage) -> dict[str, str]:
        if row.sealed_params is None:
            return {}
        assert row.id is not None
        try:
            raw = self._material.open("outbox", row.sealed_params, str(row.id).encode())
        except SealError:
            raise PermanentMailError("sealed parameters do not open (master key changed?)") from None
        opened = json.loads(raw)
        return {str(k): str(v) for k, v in opened.items()}
