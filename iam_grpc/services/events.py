"""iam.v1.EventService (admin: the caller's method allow-list must name WatchEvents)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from iam_grpc.core.event_stream import EventStream, format_cursor
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import event_pb2, event_pb2_grpc
from iam_grpc.services.convert import timestamp
from iam_grpc.storage.records import EventRecord

__all__ = ["EventService", "event_message"]


def event_message(record: EventRecord) -> event_pb2.Event:
    return event_pb2.Event(
        cursor=format_cursor(record.seq or 0),
        id=record.id,
        kind=record.kind,
        at=timestamp(record.at),
        user_id=record.user_id or "",
        session_id=record.session_id or "",
        data_json=json.dumps(record.data, separators=(",", ":"), sort_keys=True),
    )


class EventService(event_pb2_grpc.EventServiceServicer):
    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    async def WatchEvents(
        self, request: event_pb2.WatchEventsRequest, context: Ctx
    ) -> AsyncIterator[event_pb2.WatchEventsResponse]:
        async for record in self._stream.watch(request.after_cursor, list(request.kinds)):
            yield event_pb2.WatchEventsResponse(event=event_message(record))
