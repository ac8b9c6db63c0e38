"""Signed webhooks (Standard Webhooks): every event POSTed to one endpoint, retried with
exponential backoff, dead after ``max_attempts`` (``iam-grpc events deliveries`` lists and
replays them).

Each replica runs a sender. New events become deliveries in one transaction with the sink's mark
(``storage/sql/deliveries.py``), so each event is one delivery whichever replica takes it; a
delivery is leased to one sender while it is attempted. Delivery is at least once: a receiver
deduplicates by ``webhook-id`` (the event id).

The body::

    {"type": "session.revoked", "timestamp": "2026-12-07T17:00:00.123456Z",
     "data": {"id": …, "cursor": …, "kind": …, "at": …, "user_id": …, "session_id": …,
              "data": {"reason": "logout"}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from iam_grpc.background import WokenLoop
from iam_grpc.clock import Clock
from iam_grpc.config import WebhookSettings
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.push.http_post import Endpoint, PostFailed, post
from iam_grpc.push.signing import secret_key, sign
from iam_grpc.storage.ports import Conflict
from iam_grpc.storage.records import EventDelivery, EventRecord
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.storage.sql.deliveries import SqlEventDeliveries

__all__ = ["SINK", "WebhookSender", "webhook_body"]

SINK = "webhook"
log = component_logger("iam.events.webhook")
_STOP_GRACE = 10.0  # seconds the pass in hand may take at shutdown, then again once cancelled


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def webhook_body(record: EventRecord) -> bytes:
    payload: dict[str, Any] = {
        "type": record.kind,
        "timestamp": _iso(record.at),
        "data": {
            "id": record.id,
            "cursor": str(record.seq or 0),
            "kind": record.kind,
            "at": _iso(record.at),
            "user_id": record.user_id or "",
            "session_id": record.session_id or "",
            "data": record.data,
        },
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class WebhookSender:
    """``async with`` runs the sender; :meth:`wake` looks for work at once; :meth:`run_once` is
    one pass (tests)."""

    def __init__(
        self, db: SqlDatabase, clock: Clock, settings: WebhookSettings, *, interval: timedelta
    ) -> None:
        assert settings.secret is not None
        self._db = db
        self._clock = clock
        self._settings = settings
        self._key = secret_key(settings.secret.get_secret_value())
        self._endpoint = Endpoint.parse(settings.url)
        self._worker = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(3)}"
        self._loop = WokenLoop("webhook-sender", self._pass, interval.total_seconds(), grace=_STOP_GRACE)

    def wake(self) -> None:
        self._loop.wake()

    def _store(self, tx: Any) -> SqlEventDeliveries:
        return SqlEventDeliveries(tx.connection, self._db.dialect)

    def retry_at(self, attempts: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts`` failed attempts; None: dead."""
        s = self._settings
        if attempts >= s.max_attempts:
            return None
        delay: timedelta = min(s.backoff * (2 ** (attempts - 1)), s.backoff_max)
        return now + delay

    async def run_once(self) -> int:
        """Turn new events into deliveries, then attempt the due ones; how many were attempted."""
        now = self._clock.now()
        with contextlib.suppress(Conflict):  # another replica started the sink's mark first
            async with self._db.transaction() as tx:
                await self._store(tx).enqueue_new(SINK, now)
        lease = self._settings.timeout * 2 + timedelta(seconds=5)
        async with self._db.transaction() as tx:
            claimed = await self._store(tx).claim(SINK, now, self._worker, self._settings.batch, lease)
        for delivery, record in claimed:
            await self._attempt(delivery, record)
        return len(claimed)

    async def _attempt(self, delivery: EventDelivery, record: EventRecord) -> None:
        body = webhook_body(record)
        stamp = int(self._clock.now().timestamp())
        headers = [
            ("Content-Type", "application/json"),
            ("User-Agent", "iam-grpc-webhooks"),
            ("webhook-id", record.id),
            ("webhook-timestamp", str(stamp)),
            ("webhook-signature", sign(self._key, record.id, stamp, body)),
        ]
        error: str | None = None
        try:
            async with asyncio.timeout(self._settings.timeout.total_seconds()):
                await post(self._endpoint, headers, body)
        except PostFailed as exc:
            error = exc.summary
        except TimeoutError:
            error = "timeout"
        now = self._clock.now()
        async with self._db.transaction() as tx:
            store = self._store(tx)
            if error is None:
                await store.delivered(delivery.id, self._worker, now)
                return
            retry = self.retry_at(delivery.attempts + 1, now)
            await store.failed(delivery.id, self._worker, error, retry)
        bound = log.bind(delivery=delivery.id, kind=record.kind, attempts=delivery.attempts + 1, error=error)
        if retry is None:
            bound.warning("webhook delivery dead after its last attempt")
        else:
            bound.info("webhook delivery failed; retrying later")

    async def _pass(self) -> None:
        try:
            await self.run_once()
        except BackendUnavailable:
            log.warning("webhook sender could not reach the database")

    async def __aenter__(self) -> Self:
        self._loop.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._loop.stop()  # the delivery in hand finishes first
        with contextlib.suppress(Exception):
            async with self._db.transaction() as tx:
                await self._store(tx).release(self._worker)
