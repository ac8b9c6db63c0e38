"""Builders of the event stream and its push sinks (api.md EventService)."""

from __future__ import annotations

from iam_grpc.clock import Clock
from iam_grpc.config import Settings
from iam_grpc.core.event_stream import EventStream
from iam_grpc.wiring.stores import Stores

__all__ = ["build_event_stream"]


def build_event_stream(settings: Settings, stores: Stores, clock: Clock) -> EventStream:
    s = settings.events
    return EventStream(
        stores.db,
        clock,
        retention=s.retention,
        poll_interval=s.poll_interval,
        buffer=s.watcher_buffer,
    )
