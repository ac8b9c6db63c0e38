"""Builders of the event stream and its push sinks (api.md EventService)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iam_grpc.clock import Clock
from iam_grpc.config import Settings
from iam_grpc.core.event_stream import EventStream
from iam_grpc.push.nats import NatsPublisher
from iam_grpc.push.webhooks import WebhookSender
from iam_grpc.wiring.stores import Stores

__all__ = ["EventParts", "build_events"]


@dataclass(frozen=True, slots=True)
class EventParts:
    stream: EventStream
    webhooks: WebhookSender | None  # None: events.webhook.url unset
    nats: NatsPublisher | None  # None: events.nats.url (IAM_NATS_URL) unset


def build_events(settings: Settings, stores: Stores, clock: Clock) -> EventParts:
    s = settings.events
    webhooks = WebhookSender(stores.db, clock, s.webhook, interval=s.poll_interval) if s.webhook.url else None
    publisher = NatsPublisher(stores.db, s.nats, interval=s.poll_interval) if s.nats.url else None
    wake: list[Callable[[], None]] = [sink.wake for sink in (webhooks, publisher) if sink is not None]
    stream = EventStream(
        stores.db,
        clock,
        retention=s.retention,
        poll_interval=s.poll_interval,
        buffer=s.watcher_buffer,
        on_new_events=wake,
    )
    return EventParts(stream, webhooks, publisher)
