"""EventService.WatchEvents through the real server, on both backends: from now, resumed from a
cursor, filtered by kind, refused for an expired or malformed cursor and for a caller without the
method, seen across two replicas, and ended cleanly when the server drains."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from iam_grpc.admin import AdminTools, grant_role, rotate_key
from iam_grpc.app import Application
from iam_grpc.proto import event_pb2, event_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.sessions_helper import new_session, new_user

FAST = {"IAM_EVENTS__POLL_INTERVAL": "20ms"}
WAIT = 10.0


class Watch:
    """One WatchEvents call, read in the background into a queue."""

    def __init__(
        self, iam: RunningService, cursor: str = "", kinds: tuple[str, ...] = (), **meta: str
    ) -> None:
        self._channel = iam.channel()
        stub = event_pb2_grpc.EventServiceStub(self._channel)
        self.call = stub.WatchEvents(
            event_pb2.WatchEventsRequest(after_cursor=cursor, kinds=list(kinds)),
            metadata=tuple(meta.items()),
        )
        self.events: asyncio.Queue[event_pb2.Event] = asyncio.Queue()
        self.ended: asyncio.Future[grpc.StatusCode] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for answer in self.call:
                self.events.put_nowait(answer.event)
            self.ended.set_result(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            self.ended.set_result(error.code())
            self.error = error

    async def next_of(self, user_id: str) -> event_pb2.Event:
        """The next event about ``user_id`` (other tests share the database)."""
        async with asyncio.timeout(WAIT):
            while True:
                event = await self.events.get()
                if event.user_id == user_id:
                    return event

    async def next_kind(self, kind: str) -> event_pb2.Event:
        async with asyncio.timeout(WAIT):
            while True:
                event = await self.events.get()
                if event.kind == kind:
                    return event

    async def started(self) -> None:
        """Wait until the server has the call (its initial metadata arrived)."""
        async with asyncio.timeout(WAIT):
            await self.call.initial_metadata()
        await asyncio.sleep(0.1)  # the watch takes its position from SQL after the metadata

    async def close(self) -> None:
        self.call.cancel()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()


async def kinds_of(watch: Watch, user_id: str, count: int) -> list[str]:
    return [(await watch.next_of(user_id)).kind for _ in range(count)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    """One service per backend for the module (tests look only at their own users' events)."""
    async with running_service(tmp_path_factory.mktemp("events"), {**backend.isolated(), **FAST}) as running:
        yield running


async def logout(app: Application, refresh_token: str) -> None:
    await app.components.sessions.logout(refresh_token)


async def test_a_watch_from_now_sees_each_new_event_with_its_data(iam: RunningService) -> None:
    """An empty cursor starts from now: a new session and its logout arrive, the revocation with
    its reason, each with an id, a cursor and a time."""
    watch = Watch(iam)
    try:
        await watch.started()
        user, issued = await new_session(iam.app)
        created = await watch.next_of(user.id)
        assert (created.kind, created.session_id) == ("session.created", issued.session_id)
        await logout(iam.app, issued.refresh_token)
        revoked = await watch.next_of(user.id)
        assert revoked.kind == "session.revoked"
        assert json.loads(revoked.data_json) == {"reason": "logout"}
        assert int(revoked.cursor) > int(created.cursor)
        assert len(created.id) == 26
        assert created.id != revoked.id
        assert created.at.seconds > 0
    finally:
        await watch.close()


async def test_a_watch_resumes_after_a_cursor(iam: RunningService) -> None:
    """A second watch from the first event's cursor gets the events after it, in order."""
    watch = Watch(iam)
    try:
        await watch.started()
        user, issued = await new_session(iam.app)
        first = await watch.next_of(user.id)
        await logout(iam.app, issued.refresh_token)
        await new_session(iam.app, user)
        assert await kinds_of(watch, user.id, 2) == ["session.revoked", "session.created"]
    finally:
        await watch.close()
    resumed = Watch(iam, first.cursor)
    try:
        assert await kinds_of(resumed, user.id, 2) == ["session.revoked", "session.created"]
    finally:
        await resumed.close()


async def test_a_kinds_filter_leaves_out_other_kinds(iam: RunningService) -> None:
    """With kinds, only those kinds arrive (here role.granted, not session.created)."""
    watch = Watch(iam, kinds=("role.granted",))
    try:
        await watch.started()
        user, _ = await new_session(iam.app)
        tools = AdminTools.from_components(iam.app.components)
        assert await grant_role(tools, user.id, "admin")
        granted = await watch.next_of(user.id)
        assert (granted.kind, json.loads(granted.data_json)) == (
            "role.granted",
            {"role": "admin", "end_sessions": False},
        )
        assert watch.events.empty()
    finally:
        await watch.close()


async def test_keys_rotated_is_an_event_of_no_user(own_database: Backend, tmp_path: Path) -> None:
    """Rotating the signing key writes keys.rotated with the new kid and no user."""
    async with running_service(tmp_path, {**own_database.environ, **FAST}) as iam:
        watch = Watch(iam, kinds=("keys.rotated",))
        try:
            await watch.started()
            rotated = await rotate_key(
                AdminTools.from_components(iam.app.components), immediate=False, revoke=None
            )
            event = await watch.next_kind("keys.rotated")
            assert event.user_id == ""
            assert json.loads(event.data_json)["kid"] == rotated.kid
        finally:
            await watch.close()


async def refusal(
    iam: RunningService, cursor: str = "", kinds: tuple[str, ...] = (), **meta: str
) -> tuple[grpc.StatusCode, str | None]:
    watch = Watch(iam, cursor, kinds, **meta)
    try:
        async with asyncio.timeout(WAIT):
            code = await watch.ended
        assert code != grpc.StatusCode.OK
        return code, error_details(watch.error).reason
    finally:
        await watch.close()


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", " 1", "1\n", "１", "9" * 40])
async def test_a_malformed_cursor_is_invalid_argument(iam: RunningService, cursor: str) -> None:
    """A cursor this stream never hands out in that shape is INVALID_ARGUMENT."""
    assert await refusal(iam, cursor) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


@pytest.mark.parametrize("kind", ["", "user.*", "nope", "session.created\n"])
async def test_an_unknown_kind_is_invalid_argument(iam: RunningService, kind: str) -> None:
    """A kind filter naming no kind of the contract is INVALID_ARGUMENT (a typo would watch nothing)."""
    assert await refusal(iam, "", (kind,)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_cursor_past_the_retention_is_cursor_expired(iam: RunningService) -> None:
    """Once events after a cursor are purged by the retention, the cursor answers OUT_OF_RANGE
    CURSOR_EXPIRED; a cursor never handed out (beyond the newest) too."""
    app = iam.app
    old = app.clock.now() - timedelta(days=8)
    user = await new_user(app)
    await app.components.events.poll_once()
    async with app.components.db.transaction() as tx:
        before = await tx.events.head()
        await tx.events.append("user.created", old, user_id=user.id)
    await app.components.events.poll_once()
    assert await app.components.events.purge_expired() >= 1
    expired = (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
    assert await refusal(iam, str(before)) == expired
    assert await refusal(iam, str(10**18)) == expired


CALLER_KEY = "iamk_ops_" + "d" * 43
WATCHER_KEY = "iamk_wat_" + "e" * 43


async def test_a_caller_without_the_method_is_refused(backend: Backend, tmp_path: Path) -> None:
    """WatchEvents is admin: a caller whose allow-list does not name it gets PERMISSION_DENIED
    CALLER_UNKNOWN; one that names it watches; no key at all is UNAUTHENTICATED."""
    digest = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
    env = {
        **backend.isolated(),
        **FAST,
        "IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK": "false",
        "IAM_CALLERS__OPS__API_KEY_SHA256": json.dumps([digest(CALLER_KEY)]),
        "IAM_CALLERS__OPS__METHODS": '["iam.v1.TokenService/*"]',
        "IAM_CALLERS__WAT__API_KEY_SHA256": json.dumps([digest(WATCHER_KEY)]),
        "IAM_CALLERS__WAT__METHODS": '["iam.v1.EventService/WatchEvents"]',
    }
    async with running_service(tmp_path, env) as iam:
        key = "x-iam-api-key"
        assert await refusal(iam, **{key: CALLER_KEY}) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_UNKNOWN",
        )
        assert await refusal(iam) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")
        watch = Watch(iam, **{key: WATCHER_KEY})
        try:
            await watch.started()
            user, _ = await new_session(iam.app)
            assert (await watch.next_of(user.id)).kind == "session.created"
        finally:
            await watch.close()


async def test_a_watcher_on_one_replica_sees_events_written_on_another(
    own_database: Backend, tmp_path: Path
) -> None:
    """Two replicas on one database: a session opened and ended through one reaches a watcher on
    the other, in order."""
    env = {**own_database.environ, **FAST}
    async with (
        running_service(tmp_path / "a", {**env, "IAM_DATA_DIR": str(tmp_path)}) as one,
        running_service(tmp_path / "b", {**env, "IAM_DATA_DIR": str(tmp_path)}) as other,
    ):
        watch = Watch(other)
        try:
            await watch.started()
            user, issued = await new_session(one.app)
            await logout(one.app, issued.refresh_token)
            assert await kinds_of(watch, user.id, 2) == ["session.created", "session.revoked"]
        finally:
            await watch.close()


async def test_a_slow_watcher_loses_no_event(backend: Backend, tmp_path: Path) -> None:
    """A watcher whose buffer overflows reads the missed events from SQL: all arrive, in order."""
    env = {**backend.isolated(), **FAST, "IAM_EVENTS__WATCHER_BUFFER": "10"}
    async with running_service(tmp_path, env) as iam:
        user = await new_user(iam.app)
        watch = Watch(iam)
        try:
            await watch.started()
            now = iam.app.clock.now()
            for n in range(60):
                async with iam.app.components.db.transaction() as tx:
                    await tx.events.append("user.updated", now, user_id=user.id, data={"n": n})
            got = [json.loads((await watch.next_of(user.id)).data_json)["n"] for _ in range(60)]
            assert got == list(range(60))
        finally:
            await watch.close()


async def test_a_watch_ends_with_ok_when_the_server_drains(backend: Backend, tmp_path: Path) -> None:
    """Stopping the service ends open watches cleanly (status OK) instead of cutting them."""
    async with running_service(tmp_path, {**backend.isolated(), **FAST}) as iam:
        watch = Watch(iam)
        await watch.started()
        await iam.app.stop(drain_delay=timedelta(0), grace=timedelta(seconds=5))
        async with asyncio.timeout(WAIT):
            assert await watch.ended == grpc.StatusCode.OK
        await watch.close()
