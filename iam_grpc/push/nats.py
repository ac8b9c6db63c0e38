"""Events to NATS JetStream: every event published to ``<subject_prefix>.<kind>`` with header
``Nats-Msg-Id`` = the event id, in cursor order.

The publisher's position is the ``sink:nats`` mark. Each replica publishes from it and moves it
forward only after JetStream acknowledged (never back): two replicas may publish one event twice,
and JetStream drops the second within the stream's duplicate window. A failed publish stops the
pass; the next pass starts again from the mark (at least once, in order). A publisher configured
for the first time starts at the newest cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any, Self

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from iam_grpc.background import WokenLoop
from iam_grpc.config import NatsSettings
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.push.webhooks import webhook_body
from iam_grpc.storage.ports import Conflict
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.storage.sql.events import SEQUENCE_MARK, SqlEventLog, read_mark, write_mark

__all__ = ["MARK", "NatsPublisher"]

MARK = "sink:nats"
_BATCH = 500
log = component_logger("iam.events.nats")
_STOP_GRACE = 10.0  # seconds the pass in hand may take at shutdown, then again once cancelled


class NatsPublisher:
    """``async with`` runs the publisher; :meth:`run_once` is one pass (tests)."""

    def __init__(self, db: SqlDatabase, settings: NatsSettings, *, interval: timedelta) -> None:
        self._db = db
        self._settings = settings
        self._timeout = settings.timeout.total_seconds()
        self._client: NatsClient | None = None
        self._connecting = asyncio.Lock()
        self._loop = WokenLoop("nats-publisher", self._pass, interval.total_seconds(), grace=_STOP_GRACE)

    def wake(self) -> None:
        self._loop.wake()

    def subject(self, kind: str) -> str:
        return f"{self._settings.subject_prefix}.{kind}"

    async def _connected(self) -> Any:
        async with self._connecting:  # one connection, even when a test's pass meets the loop's
            return await self._connect()

    async def _connect(self) -> Any:
        if self._client is None or self._client.is_closed:
            self._client = await nats.connect(
                self._settings.url,
                connect_timeout=self._timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                name="iam-grpc",
            )
            js = self._client.jetstream(timeout=self._timeout)
            if self._settings.stream:
                try:
                    await js.stream_info(self._settings.stream)
                except NotFoundError:
                    await js.add_stream(
                        StreamConfig(name=self._settings.stream, subjects=[self.subject(">")])
                    )
        return self._client.jetstream(timeout=self._timeout)

    async def run_once(self) -> int:
        """Publish the events after the mark; how many were acknowledged."""
        js = await self._connected()  # the stream exists from the first pass on
        async with self._db.transaction(read_only=True) as tx:
            mark = await read_mark(tx.connection, MARK)
            if mark is None:
                start = await read_mark(tx.connection, SEQUENCE_MARK) or 0
            else:
                start = mark
                new = await SqlEventLog(tx.connection, self._db.dialect).after(mark, limit=_BATCH)
        if mark is None:
            with contextlib.suppress(Conflict):  # another replica started the mark first
                async with self._db.transaction() as tx:
                    if await read_mark(tx.connection, MARK) is None:
                        await write_mark(tx.connection, MARK, start, known=None)
            return 0
        if not new:
            return 0
        published = start
        try:
            for record in new:
                await js.publish(
                    self.subject(record.kind),
                    webhook_body(record),
                    headers={"Nats-Msg-Id": record.id},
                )
                published = record.seq or published
        finally:
            if published > start:
                await self._advance(published)
        return len(new)

    async def _advance(self, to: int) -> None:
        async with self._db.transaction() as tx:
            known = await read_mark(tx.connection, MARK)
            if known is None or known < to:
                await write_mark(tx.connection, MARK, to, known=known)

    async def _pass(self) -> None:
        try:
            await self.run_once()
        except BackendUnavailable:
            log.warning("NATS publisher could not reach the database")
        except (NatsError, OSError, TimeoutError) as exc:
            log.bind(error=type(exc).__name__).warning("NATS publish failed; retrying")

    async def __aenter__(self) -> Self:
        self._loop.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._loop.stop()  # the publish in hand finishes first
        if self._client is not None and not self._client.is_closed:
            # every publish was acknowledged or will be retried: close, bounded, no drain
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await self._client.close()
        self._client = None
