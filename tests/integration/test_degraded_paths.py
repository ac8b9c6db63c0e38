"""Degraded paths end to end (security.md S60, S61, S68): SMTP down, short deadlines and a login
storm, each against a real running service on both backends."""

from __future__ import annotations

import asyncio
import inspect
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iam_grpc.app import Application
from iam_grpc.config import PasswordsSettings
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.storage.records import OutboxMessage
from iam_grpc.testing import running_service
from tests.accounts_helper import (
    NO_BURSTS,
    PASSWORD,
    account_env,
    client,
    failure,
    new_email,
    signup,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.served import serve
from tests.sessions_helper import IPHONE

LOGIN = "/iam.v1.AuthService/Login"
SERVING = health_pb2.HealthCheckResponse.SERVING

# ---------------------------------------------------------------------------------------------------
# helpers


async def outbox_rows(app: Application, to: str) -> list[OutboxMessage]:
    """Every outbox row addressed to ``to``, oldest first."""
    async with app.components.db.transaction() as tx:
        rows = await tx.outbox.list(limit=1000)
    return sorted((r for r in rows if r.recipient == to), key=lambda r: r.id or 0)


async def outbox_row(app: Application, message_id: int) -> OutboxMessage:
    async with app.components.db.transaction() as tx:
        found = await tx.outbox.get(message_id)
    assert found is not None
    return found


async def eventually(
    probe: Callable[[], object], what: str, seconds: float = 15.0, every: float = 0.05
) -> None:
    """Poll ``probe`` (plain or async) until it answers true, failing with ``what`` after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        outcome = probe()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {seconds} s: {what}")
        await asyncio.sleep(every)


async def the_row(app: Application, to: str, kind: str) -> OutboxMessage:
    """The single row of ``kind`` to ``to`` once it exists."""
    found: list[OutboxMessage] = []

    async def exists() -> bool:
        found[:] = [r for r in await outbox_rows(app, to) if r.kind == kind]
        return bool(found)

    await eventually(exists, f"a {kind} row to {to}")
    assert len(found) == 1, [(r.kind, r.status) for r in found]
    return found[0]


@asynccontextmanager
async def health_watch(channel: grpc.aio.Channel, every: float = 0.1) -> AsyncIterator[list[int]]:
    """Poll gRPC Health (overall status) in the background; yields every status seen."""
    stub = health_pb2_grpc.HealthStub(channel)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.append((await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
            await asyncio.sleep(every)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        stop.set()
        await task


# ---------------------------------------------------------------------------------------------------
# S60


async def test_with_smtp_down_nothing_is_lost_and_nothing_stale_is_sent(
    backend: Backend, tmp_path: Path
) -> None:
    """S60: with SMTP refusing connections, RequestPasswordReset answers OK and its row stays
    pending with rising attempts; a sign-in code whose challenge expires meanwhile ends ``expired``
    and is never sent; health stays SERVING throughout; once SMTP is back the reset email arrives
    and no sign-in code does; a 5xx answer then makes a new reset row ``dead`` at once.

    Time is compressed, not faked: retries every 0.3 s then every 1 s (production: 30 s, 1 min,
    ... 2 h) with ``mail.max_attempts = 50`` so that no row reaches ``dead`` by attempts while the
    test waits, and ``mfa.ttl = 4 s`` (production 10 min)."""
    box = Mailbox()  # not started: SMTP connections are refused
    env = account_env(
        backend,
        box,
        {"login.pair": {"windows": ["1000/1h fc"]}},
        IAM_MAIL__RETRY_BACKOFF='["300ms", "1s"]',
        IAM_MAIL__MAX_ATTEMPTS="50",
        IAM_MFA__TTL="4s",
    )
    email = new_email()
    async with (
        running_service(tmp_path, env, probe_interval=0.2) as iam,
        iam.channel() as channel,
        health_watch(channel) as health,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        await signup(auth, email)
        # Signup sends nothing (behaviour.md 2.3); whatever it might queue is told apart by kind.
        before = {r.id for r in await outbox_rows(iam.app, email)}

        await auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(client=client(), email=email))
        reset = await the_row(iam.app, email, "password_reset")
        assert reset.id is not None
        assert reset.id not in before

        attempts: list[int] = []

        async def retried_three_times() -> bool:
            now = await outbox_row(iam.app, reset.id)  # type: ignore[arg-type]
            assert now.status == "pending", (now.status, now.last_error)
            attempts.append(now.attempts)
            return now.attempts >= 3

        await eventually(retried_three_times, "three failed attempts of the reset email", every=0.1)
        assert attempts == sorted(attempts)  # attempts only ever rise
        waiting = await outbox_row(iam.app, reset.id)
        assert waiting.last_error is not None
        assert waiting.last_error.startswith("connection failed"), waiting.last_error
        assert waiting.sealed_params is not None  # the link is kept for the later send

        # A sign-in from another device raises an MFA challenge whose code cannot be delivered.
        answer = await auth.Login(
            auth_pb2.LoginRequest(client=client(ip="203.0.113.77", ua=IPHONE), email=email, password=PASSWORD)
        )
        assert answer.WhichOneof("result") == "mfa"
        code = await the_row(iam.app, email, "mfa_code")
        assert code.id is not None
        assert code.status == "pending"

        async def expired() -> bool:
            return (await outbox_row(iam.app, code.id)).status == "expired"  # type: ignore[arg-type]

        await eventually(expired, "the sign-in code email expires with its challenge", seconds=20)
        stale = await outbox_row(iam.app, code.id)
        assert stale.sealed_params is None  # the code is wiped, not kept for later
        assert stale.sent_at is None
        still = await outbox_row(iam.app, reset.id)
        assert (still.status, still.sent_at) == ("pending", None)
        assert still.attempts > waiting.attempts

        box.start()
        try:
            (mail,) = await wait_for_mail(box, email, "Reset your", timeout=20)

            async def sent() -> bool:
                return (await outbox_row(iam.app, reset.id)).status == "sent"  # type: ignore[arg-type]

            await eventually(sent, "the reset row is marked sent")
            delivered = await outbox_row(iam.app, reset.id)
            assert delivered.sealed_params is None
            assert delivered.provider_message_id == mail["Message-ID"]
            await asyncio.sleep(1.0)  # ten sender polls: time for anything stale to slip out
            assert [str(m["Subject"]) for m in box.to(email) if "sign-in code" in str(m["Subject"])] == []
            assert (await outbox_row(iam.app, code.id)).status == "expired"

            # A permanent refusal (5xx) is final at once: dead after one attempt, nothing delivered.
            box.mode = "permanent"
            await auth.RequestPasswordReset(
                auth_pb2.RequestPasswordResetRequest(client=client(), email=email)
            )

            async def second_reset_dead() -> bool:
                resets = [r for r in await outbox_rows(iam.app, email) if r.kind == "password_reset"]
                return len(resets) == 2 and resets[-1].status == "dead"

            await eventually(second_reset_dead, "the second reset email is dead-lettered")
            dead = [r for r in await outbox_rows(iam.app, email) if r.kind == "password_reset"][-1]
            assert (dead.attempts, dead.sealed_params, dead.last_error) == (
                1,
                None,
                "SMTP 550 server refused the message",
            )
            assert len(box.to(email)) == 1  # the one reset email, nothing else
        finally:
            box.stop()
    assert len(health) >= 20, health  # polled throughout (every 0.1 s for several seconds)
    assert set(health) == {SERVING}, health


# ---------------------------------------------------------------------------------------------------
# S61


def _sample(app: Application, name: str, labels: dict[str, str]) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def verifications(app: Application) -> float:
    return _sample(app, "iam_password_verifications_total", {})


class HashWatch:
    """Samples ``iam_password_hashes{state="running"}`` in the background; records the maximum."""

    def __init__(self, app: Application, every: float = 0.001) -> None:
        self._app = app
        self._every = every
        self.max_running = 0.0
        self.max_queued = 0.0
        self.samples = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HashWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.max_running = max(
                self.max_running, _sample(self._app, "iam_password_hashes", {"state": "running"})
            )
            self.max_queued = max(
                self.max_queued, _sample(self._app, "iam_password_hashes", {"state": "queued"})
            )
            self.samples += 1
            await asyncio.sleep(self._every)


# The requirement's 150 ms, plus 150 ms for scheduling on a loaded shared 2-core machine (the client
# and the server share this process's event loop). A call that waited for a started hash and the
# deadline's own expiry would still be caught by the counters below, not by this bound.
CLIENT_BOUND = 0.15 + 0.15
SERVER_BOUND = 0.15  # the server's own handling time of the call (iam_rpc_duration_seconds)


async def test_a_login_with_a_100ms_deadline_starts_no_hash(backend: Backend, tmp_path: Path) -> None:
    """S61: Login with a 100 ms deadline, for a known and for an unknown email, with the production
    argon2 parameters, ends with DEADLINE_EXCEEDED within 150 ms, starts no argon2 verification
    (``iam_password_verifications_total`` unchanged, ``iam_password_hashes{running}`` never above 0)
    and is counted in ``iam_password_hashes_refused{reason="deadline"}``. A Login without a short
    deadline, in between, does verify (the counters can see a hash)."""
    env = {
        **backend.isolated(),
        "IAM_RATELIMIT__GROUPS": json.dumps({**NO_BURSTS, "login.pair": {"windows": ["1000/1h fc"]}}),
    }
    known = new_email()
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        app = iam.app
        production = PasswordsSettings()  # the defaults, as no IAM_ARGON2_* is set
        assert (app.settings.passwords.memory_kib, app.settings.passwords.time_cost) == (
            production.memory_kib,
            production.time_cost,
        )
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        device = (await signup(auth, known)).device_id
        timings: list[tuple[str, float, float]] = []
        for round_ in range(3):
            for label, email in (("known", known), ("unknown", new_email())):
                request = auth_pb2.LoginRequest(
                    client=client(device_id=device), email=email, password=PASSWORD
                )
                verified = verifications(app)
                refused = _sample(app, "iam_password_hashes_refused", {"reason": "deadline"})
                exceeded = _sample(app, "iam_rpc_total", {"method": LOGIN, "code": "DEADLINE_EXCEEDED"})
                handled = _sample(app, "iam_rpc_duration_seconds_sum", {"method": LOGIN})
                async with HashWatch(app) as watch:
                    started = time.perf_counter()
                    status, _ = await failure(auth.Login(request, timeout=0.1))
                    elapsed = time.perf_counter() - started
                    # the server's side of the call may finish just after the client gave up
                    await eventually(
                        lambda before=exceeded: (
                            _sample(  # type: ignore[misc]
                                app, "iam_rpc_total", {"method": LOGIN, "code": "DEADLINE_EXCEEDED"}
                            )
                            > before
                        ),
                        "the server ends the Login with DEADLINE_EXCEEDED",
                        seconds=5,
                    )
                    await asyncio.sleep(0.2)  # a hash started anyway would be seen running or counted
                server = _sample(app, "iam_rpc_duration_seconds_sum", {"method": LOGIN}) - handled
                timings.append((label, elapsed, server))
                assert status == grpc.StatusCode.DEADLINE_EXCEEDED, (label, status)
                assert elapsed < CLIENT_BOUND, (label, round_, timings)
                assert server < SERVER_BOUND, (label, round_, timings)
                assert watch.samples > 10
                assert watch.max_running == 0, (label, "a hash started")
                assert verifications(app) == verified, label
                assert _sample(app, "iam_password_hashes_refused", {"reason": "deadline"}) == refused + 1

                # Control: the same Login with the default deadline verifies once.
                with_time = verifications(app)
                async with HashWatch(app) as watch:
                    if label == "known":
                        assert (await auth.Login(request)).WhichOneof("result") == "session"
                    else:
                        status, details = await failure(auth.Login(request))
                        assert (status, details.reason) == (
                            grpc.StatusCode.UNAUTHENTICATED,
                            "INVALID_CREDENTIALS",
                        )
                assert verifications(app) == with_time + 1
                assert watch.max_running >= 1


# ---------------------------------------------------------------------------------------------------
# S68

STORM = 50
P99_BOUND = 0.020  # the requirement's 20 ms


async def test_a_login_storm_cannot_starve_token_verification(backend: Backend, tmp_path: Path) -> None:
    """S68: 50 parallel Logins keep at most ``passwords.max_concurrent_hashes`` verifications in
    flight (``iam_password_hashes_peak``: the pool really is used to the full and calls queue), and
    VerifyAccessToken, called in a loop meanwhile, keeps its p99 under 20 ms.

    The service runs as its own process (``iam-grpc serve``), as in production: clients sharing
    its event loop and GIL would be measured with it. ``max_concurrent_hashes`` is left at its
    default (the CPU count); the limiter groups a storm from one address would trip are widened,
    as the requirement is about hashing. The 50 Logins use 50 unknown addresses: each costs one
    argon2 verification like a real one."""
    wide = {"windows": ["100000/1s"]}
    groups = {"login.ip": wide, "login.ip_fail": {"windows": ["100000/1h f"]}, "signup.ip": wide}
    env = {**backend.isolated(), "IAM_RATELIMIT__GROUPS": json.dumps(groups)}
    limit = PasswordsSettings().max_concurrent_hashes  # the default: not set above
    with serve(tmp_path, env) as served:
        async with grpc.aio.insecure_channel(served.address) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            tokens = token_pb2_grpc.TokenServiceStub(channel)
            session = await signup(auth, new_email())
            verify = token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)

            async def verify_latencies(more: Callable[[list[float]], bool]) -> list[float]:
                """VerifyAccessToken one call after another while ``more(latencies so far)``."""
                seen: list[float] = []
                while more(seen):
                    started = time.perf_counter()
                    answer = await tokens.VerifyAccessToken(verify)
                    seen.append(time.perf_counter() - started)
                    assert answer.session_id == session.session_id
                return seen

            for _ in range(20):  # warm the channel and the key cache
                await tokens.VerifyAccessToken(verify)
            quiet = await verify_latencies(lambda seen: len(seen) < 200)  # for the report only
            verified = served.metric("iam_password_verifications_total")
            logins = [
                auth.Login(auth_pb2.LoginRequest(client=client(), email=new_email(), password=PASSWORD))
                for _ in range(STORM)
            ]
            storm = asyncio.gather(*(failure(call) for call in logins))
            busy = await verify_latencies(lambda _: not storm.done())
            outcomes = await storm
        assert served.metric("iam_password_verifications_total") == verified + STORM
        assert {(code, details.reason) for code, details in outcomes} == {
            (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
        }
        peak_running = served.metric("iam_password_hashes_peak", {"state": "running"})
        peak_queued = served.metric("iam_password_hashes_peak", {"state": "queued"})

    report = {
        "max_concurrent_hashes": limit,
        "peak_running": peak_running,
        "peak_queued": peak_queued,
        "quiet_p99_ms": round(_p99(quiet) * 1000, 2),
        "storm_p99_ms": round(_p99(busy) * 1000, 2),
        "storm_median_ms": round(statistics.median(busy) * 1000, 2),
        "storm_max_ms": round(max(busy) * 1000, 2),
        "storm_samples": len(busy),
    }
    print("S68", report)
    assert len(busy) >= 50, report  # token checks kept running during the storm
    assert peak_running == limit, report  # the pool was used to the full, never beyond
    assert peak_queued > 0, report  # and calls waited for a slot
    assert _p99(busy) < P99_BOUND, report


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]
