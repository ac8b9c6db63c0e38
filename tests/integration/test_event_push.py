"""Push delivery of events through a running service, on both backends: Standard Webhooks to a
real HTTP receiver on 127.0.0.1 (signature, retry after a 500, dead letter, replay) and NATS
JetStream on 127.0.0.1:4222 (a stream of the test's own, deleted after)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from iam_grpc.admin import list_deliveries, replay_deliveries
from iam_grpc.push.signing import verify
from iam_grpc.storage.records import EventDelivery
from iam_grpc.testing import RunningService, running_service
from tests.conftest import Backend
from tests.sessions_helper import new_session
from tests.webhook_receiver import Received, WebhookReceiver

KEY = secrets.token_bytes(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
WAIT = 15.0
NATS_URL = "nats://127.0.0.1:4222"


def webhook_env(receiver: WebhookReceiver, **more: str) -> dict[str, str]:
    return {
        "IAM_EVENTS__POLL_INTERVAL": "20ms",
        "IAM_EVENTS__WEBHOOK__URL": receiver.url,
        "IAM_EVENTS__WEBHOOK__SECRET": SECRET,
        "IAM_EVENTS__WEBHOOK__BACKOFF": "50ms",
        **more,
    }


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


async def until(check: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def posts_about(receiver: WebhookReceiver, user_id: str) -> list[Received]:
    return [r for r in list(receiver.received) if json.loads(r.body)["data"]["user_id"] == user_id]


async def deliveries(iam: RunningService, status: str | None = None) -> list[EventDelivery]:
    return await list_deliveries(iam.app.components.db, status, 1000)


async def eventually(
    iam: RunningService, status: str, check: Callable[[list[EventDelivery]], bool]
) -> list[EventDelivery]:
    """The deliveries of ``status`` once ``check`` holds for them (the row is written after the POST)."""
    deadline = time.monotonic() + WAIT
    while not check(found := await deliveries(iam, status)):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {status} deliveries")
        await asyncio.sleep(0.05)
    return found


async def test_a_webhook_is_signed_the_standard_webhooks_way(
    own_database: Backend, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """Each event is POSTed once with webhook-id (the event id), webhook-timestamp and a v1
    signature that an independent HMAC-SHA256 over id.timestamp.body reproduces."""
    async with running_service(tmp_path, {**own_database.environ, **webhook_env(receiver)}) as iam:
        await iam.app.components.event_sinks.webhooks.run_once()  # type: ignore[union-attr]  # starts the mark
        user, _ = await new_session(iam.app)
        await until(lambda: posts_about(receiver, user.id), "the webhook")
        post = posts_about(receiver, user.id)[0]
        payload = json.loads(post.body)
        assert post.path == "/hooks/iam"
        assert post.headers["content-type"] == "application/json"
        assert payload["type"] == payload["data"]["kind"] == "session.created"
        assert post.headers["webhook-id"] == payload["data"]["id"]
        stamp = post.headers["webhook-timestamp"]
        assert abs(int(stamp) - time.time()) < 60
        signed = f"{post.headers['webhook-id']}.{stamp}.".encode() + post.body
        expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
        assert post.headers["webhook-signature"] == f"v1,{expected}"
        assert verify(
            KEY, post.headers["webhook-id"], int(stamp), post.body, post.headers["webhook-signature"]
        )
        assert not verify(
            KEY, post.headers["webhook-id"], int(stamp), post.body + b" ", post.headers["webhook-signature"]
        )
        event_id = payload["data"]["id"]
        delivered = await eventually(
            iam, "delivered", lambda found: any(d.event_id == event_id for d in found)
        )
        assert [d.attempts for d in delivered if d.event_id == event_id] == [1]


async def test_a_failed_webhook_is_retried_until_the_receiver_takes_it(
    own_database: Backend, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """After a 500 and a 503 the same event (same webhook-id) is sent again after the backoff,
    and counts three attempts once delivered."""
    receiver.answer(500, 503, 200)
    async with running_service(tmp_path, {**own_database.environ, **webhook_env(receiver)}) as iam:
        await iam.app.components.event_sinks.webhooks.run_once()  # type: ignore[union-attr]
        user, _ = await new_session(iam.app)
        await until(lambda: len(posts_about(receiver, user.id)) >= 3, "three attempts")
        ids = {post.headers["webhook-id"] for post in posts_about(receiver, user.id)}
        assert len(ids) == 1

        delivered = await eventually(iam, "delivered", lambda found: any(d.event_id in ids for d in found))
        assert [d.attempts for d in delivered if d.event_id in ids] == [3]


async def test_a_webhook_that_keeps_failing_is_dead_until_replayed(
    own_database: Backend, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """After max_attempts failures the delivery is dead and is not tried again; a replay queues
    it with fresh attempts, and it is delivered once the receiver answers 2xx."""
    receiver.answer(500)
    env = {**own_database.environ, **webhook_env(receiver, IAM_EVENTS__WEBHOOK__MAX_ATTEMPTS="2")}
    async with running_service(tmp_path, env) as iam:
        await iam.app.components.event_sinks.webhooks.run_once()  # type: ignore[union-attr]
        user, _ = await new_session(iam.app)
        await until(lambda: len(posts_about(receiver, user.id)) >= 2, "two attempts")
        db = iam.app.components.db
        dead = await eventually(iam, "dead", bool)
        assert len(dead) == 1
        assert dead[0].last_error == "status 500"
        await asyncio.sleep(0.3)  # several backoffs: nothing more is sent to a dead delivery
        assert len(posts_about(receiver, user.id)) == 2
        receiver.answer(200)
        assert await replay_deliveries(db, iam.app.clock, delivery_id=dead[0].id, dead=False) == 1
        await until(lambda: len(posts_about(receiver, user.id)) == 3, "the replayed delivery")
        assert [d.id for d in await eventually(iam, "delivered", bool)] == [dead[0].id]
        assert await deliveries(iam, "dead") == []


async def test_events_reach_nats_jetstream_with_their_id_for_deduplication(
    own_database: Backend, tmp_path: Path
) -> None:
    """With IAM_NATS_URL each event is published to <prefix>.<kind> with Nats-Msg-Id = event id;
    the stream (created by the service) holds it."""
    suffix = secrets.token_hex(4)
    prefix, stream = f"iamtest{suffix}.events", f"iamtest-{suffix}"
    env = {
        **own_database.environ,
        "IAM_EVENTS__POLL_INTERVAL": "20ms",
        "IAM_NATS_URL": NATS_URL,
        "IAM_EVENTS__NATS__SUBJECT_PREFIX": prefix,
        "IAM_EVENTS__NATS__STREAM": stream,
    }
    try:
        client = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as exc:
        pytest.fail(f"NATS does not answer on {NATS_URL} (scripts/services.sh starts it): {exc!r}")
    js = client.jetstream()
    try:
        async with running_service(tmp_path, env) as iam:
            publisher = iam.app.components.event_sinks.nats
            assert publisher is not None
            await publisher.run_once()  # creates the stream and starts the mark
            subscription = await js.subscribe(f"{prefix}.session.created", stream=stream)
            user, issued = await new_session(iam.app)
            async with asyncio.timeout(WAIT):
                while True:
                    message = await subscription.next_msg(timeout=WAIT)
                    await message.ack()
                    body = json.loads(message.data)
                    if body["data"]["user_id"] == user.id:
                        break
            assert message.subject == f"{prefix}.session.created"
            assert message.headers is not None
            assert message.headers["Nats-Msg-Id"] == body["data"]["id"]
            assert body["data"]["session_id"] == issued.session_id
    finally:
        await js.delete_stream(stream)
        await client.close()


async def test_an_invalid_webhook_secret_is_refused_at_start(tmp_path: Path) -> None:
    """A secret that is not base64 (or too short) is a configuration error naming the setting,
    without echoing the value."""
    from iam_grpc.config import ConfigError, load_settings

    for bad in ("not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigError) as caught:
            load_settings(
                environ={
                    "IAM_EVENTS__WEBHOOK__URL": "http://127.0.0.1:1/",
                    "IAM_EVENTS__WEBHOOK__SECRET": bad,
                }
            )
        assert "events.webhook.secret" in str(caught.value.problems)
        assert bad not in str(caught.value.problems)
