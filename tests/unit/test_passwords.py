"""Password hashing and the password policy: real argon2id at the cheapest parameters it accepts,
realistic parameters only where the cost itself is under test."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from argon2 import extract_parameters
from argon2.low_level import verify_secret
from loguru import logger

import iam_grpc.core.passwords as passwords_module
from iam_grpc.core.call import CallInfo, reset_current, set_current
from iam_grpc.core.password_policy import login_password_problems, new_password_problems
from iam_grpc.core.passwords import Argon2Params, PasswordHashing, StoredPassword
from iam_grpc.errors import BackendUnavailable, DeadlineExceeded, RateLimited

CHEAP = Argon2Params(memory_kib=8, time_cost=1, parallelism=1, hash_len=32, salt_len=16)
BASELINE = Argon2Params(memory_kib=19456, time_cost=2, parallelism=1, hash_len=32, salt_len=16)
HEAVY = Argon2Params(memory_kib=65536, time_cost=3, parallelism=1, hash_len=32, salt_len=16)  # RFC 9106 §4
PEPPER_A = b"pepper-a-" + b"a" * 23
PEPPER_A_OTHER = b"pepper-a-" + b"z" * 23
PEPPER_B = b"pepper-b-" + b"b" * 23
PASSWORD = "correct horse battery staple"


@asynccontextmanager
async def started(
    params: Argon2Params = CHEAP,
    peppers: dict[int, bytes] | None = None,
    current: int | None = 1,
    **kwargs: Any,
) -> AsyncIterator[PasswordHashing]:
    options: dict[str, Any] = {"max_concurrent": 2, "max_queued": 8, **kwargs}
    hashing = PasswordHashing(params, {1: PEPPER_A} if peppers is None else peppers, current, **options)
    await hashing.start()
    try:
        yield hashing
    finally:
        await hashing.close()


@pytest.fixture
async def hashing() -> AsyncIterator[PasswordHashing]:
    async with started() as started_hashing:
        yield started_hashing


class Argon2Calls:
    """Records every argon2 verification the module starts (and can make each one slow)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.hashes: list[bytes] = []
        self.delay = delay
        self.lock = threading.Lock()

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def recording_verify(hash: bytes, secret: bytes, type: Any) -> Any:
            with self.lock:
                self.hashes.append(hash)
            time.sleep(self.delay)
            return real(hash, secret, type)

        return recording_verify


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> Argon2Calls:
    calls = Argon2Calls()
    monkeypatch.setattr(passwords_module, "verify_secret", calls.wrap(verify_secret))
    return calls


@contextmanager
def deadline_in(seconds: float) -> Iterator[None]:
    call = CallInfo(
        method="/iam.v1.Auth/Login",
        request_id="req-test",
        peer="ipv4:127.0.0.1:1",
        peer_ip="127.0.0.1",
        deadline=time.monotonic() + seconds,
    )
    token = set_current(call)
    try:
        yield
    finally:
        reset_current(token)


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG", format="{message} {extra}")
    try:
        yield lines
    finally:
        logger.remove(sink)


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- hashing and verifying ---------------------------------------------------------------------------


async def test_a_hashed_password_verifies(hashing: PasswordHashing) -> None:
    """A password verifies against its own hash."""
    stored = await hashing.hash(PASSWORD)
    assert await hashing.verify(stored, PASSWORD)


async def test_a_wrong_password_does_not_verify(hashing: PasswordHashing) -> None:
    """Another password does not verify."""
    stored = await hashing.hash(PASSWORD)
    assert not await hashing.verify(stored, PASSWORD + "!")


async def test_hashes_are_argon2id_with_exactly_the_configured_parameters(hashing: PasswordHashing) -> None:
    """The PHC string is argon2id v19 with the configured memory, time, parallelism and lengths."""
    stored = await hashing.hash(PASSWORD)
    assert stored.phc.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    parsed = extract_parameters(stored.phc)
    assert (parsed.salt_len, parsed.hash_len) == (CHEAP.salt_len, CHEAP.hash_len)
    assert stored.pepper_id == 1


async def test_the_same_password_hashes_differently_each_time(hashing: PasswordHashing) -> None:
    """Every hash has its own random salt."""
    assert (await hashing.hash(PASSWORD)).phc != (await hashing.hash(PASSWORD)).phc


@pytest.mark.parametrize(
    ("chosen", "typed"),
    [
        ("Ｓｅｃｒｅｔ１２３４５６", "Secret123456"),  # full-width forms
        ("cafe\u0301-au-lait-2024", "caf\u00e9-au-lait-2024"),  # decomposed vs composed accent
        ("\ufb01sh-and-chips-99", "fish-and-chips-99"),  # ligature
    ],
)
async def test_nfkc_equivalent_passwords_verify(hashing: PasswordHashing, chosen: str, typed: str) -> None:
    """Passwords equal under NFKC verify against each other."""
    assert await hashing.verify(await hashing.hash(chosen), typed)


async def test_a_hash_made_with_a_pepper_does_not_verify_under_another_secret() -> None:
    """The pepper is part of the argon2 input: same id, different secret, no match."""
    async with started(peppers={1: PEPPER_A}) as original:
        stored = await original.hash(PASSWORD)
    async with started(peppers={1: PEPPER_A}) as same:
        assert await same.verify(stored, PASSWORD)
    async with started(peppers={1: PEPPER_A_OTHER}) as other:
        assert not await other.verify(stored, PASSWORD)


async def test_the_stored_pepper_id_chooses_the_pepper_for_verification() -> None:
    """After a rotation, a hash made under the old pepper still verifies with the old secret."""
    async with started(peppers={1: PEPPER_A}, current=1) as before:
        stored = await before.hash(PASSWORD)
    async with started(peppers={1: PEPPER_A, 2: PEPPER_B}, current=2) as after:
        assert await after.verify(stored, PASSWORD)
        assert (await after.hash(PASSWORD)).pepper_id == 2


async def test_an_unpeppered_hash_verifies_without_the_pepper() -> None:
    """pepper_id None means the argon2 input was the bare NFKC password."""
    async with started(peppers={}, current=None) as unpeppered:
        stored = await unpeppered.hash(PASSWORD)
    assert stored.pepper_id is None
    async with started(peppers={1: PEPPER_A}, current=1) as peppered:
        assert await peppered.verify(stored, PASSWORD)


async def test_an_unknown_pepper_id_is_false_and_costs_one_dummy_verification(
    hashing: PasswordHashing, argon2_calls: Argon2Calls
) -> None:
    """A pepper id the hasher does not know verifies False, without raising, against the dummy."""
    stored = await hashing.hash(PASSWORD)
    assert not await hashing.verify(StoredPassword(stored.phc, pepper_id=99), PASSWORD)
    assert len(argon2_calls.hashes) == 1
    assert argon2_calls.hashes[0] != stored.phc.encode()


async def test_no_stored_password_is_false_and_costs_one_verification(
    hashing: PasswordHashing, argon2_calls: Argon2Calls
) -> None:
    """verify(None, ...) checks the dummy hash once and returns False."""
    assert not await hashing.verify(None, PASSWORD)
    assert len(argon2_calls.hashes) == 1


@pytest.mark.parametrize(
    "phc",
    [
        "",
        "not a hash",
        "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=8,t=1,p=1$!!!!$????",
        "$argon2id$v=19$m=8,t=1$c2FsdHNhbHRzYWx0$aGFzaA",
        "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$",
        "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhh\x00c2g",
        "$argon2id$v=19$m=8,t=1,p=1$sälz$hash",
    ],
    ids=["empty", "text", "argon2i", "bad-base64", "missing-p", "no-hash", "nul", "non-ascii"],
)
async def test_a_corrupt_hash_is_false_without_raising_and_still_costs_a_verification(
    hashing: PasswordHashing, argon2_calls: Argon2Calls, phc: str
) -> None:
    """An unreadable PHC string verifies False and a full verification of the dummy is still made."""
    assert not await hashing.verify(StoredPassword(phc, pepper_id=1), PASSWORD)
    assert any(hash != phc.encode("utf-8", "replace") for hash in argon2_calls.hashes)


async def test_a_truncated_real_hash_is_false(hashing: PasswordHashing) -> None:
    """A real hash cut short verifies False without raising."""
    stored = await hashing.hash(PASSWORD)
    assert not await hashing.verify(StoredPassword(stored.phc[:-5], stored.pepper_id), PASSWORD)


async def test_logs_never_carry_the_password_or_the_hash(hashing: PasswordHashing) -> None:
    """The warning about an unreadable hash names neither the hash nor the password."""
    phc = "$argon2id$v=19$m=8,t=1,p=1$!!MARKERSALT$!!MARKERHASH"
    with captured_logs() as lines:
        assert not await hashing.verify(StoredPassword(phc, 1), "MARKERPASSWORD-xyz")
    assert lines, "an unreadable hash should be logged"
    assert not any("MARKER" in line for line in lines)


# --- rehash -------------------------------------------------------------------------------------------


async def test_no_rehash_for_current_parameters_and_pepper(hashing: PasswordHashing) -> None:
    """A hash made with the configured parameters and current pepper needs no rehash."""
    assert not hashing.needs_rehash(await hashing.hash(PASSWORD))


@pytest.mark.parametrize(
    "changed",
    [
        {"memory_kib": 16},
        {"time_cost": 2},
        {"parallelism": 2, "memory_kib": 16},
        {"hash_len": 16},
        {"salt_len": 32},
    ],
    ids=lambda changed: ",".join(changed),
)
async def test_rehash_when_parameters_changed(changed: dict[str, int]) -> None:
    """Any parameter differing from the configured ones asks for a rehash."""
    async with started(replace(CHEAP, **changed)) as old:
        stored = await old.hash(PASSWORD)
    async with started(CHEAP) as current:
        assert current.needs_rehash(stored)


async def test_rehash_when_the_pepper_is_not_current() -> None:
    """A hash under a retired pepper, or under none while one is configured, asks for a rehash."""
    async with started(peppers={1: PEPPER_A, 2: PEPPER_B}, current=2) as hashing:
        stored = await hashing.hash(PASSWORD)
        assert hashing.needs_rehash(StoredPassword(stored.phc, pepper_id=1))
        assert hashing.needs_rehash(StoredPassword(stored.phc, pepper_id=None))


def test_rehash_for_an_unreadable_hash() -> None:
    """needs_rehash does not raise on a corrupt hash; it answers True."""
    hashing = PasswordHashing(CHEAP, {1: PEPPER_A}, 1, max_concurrent=1, max_queued=0)
    assert hashing.needs_rehash(StoredPassword("garbage", 1))


# --- concurrency and deadlines ---------------------------------------------------------------------


async def test_a_call_beyond_the_queue_bound_is_refused_at_once() -> None:
    """With one worker and one queue place, a third concurrent call gets RATE_LIMITED; the others finish."""
    async with started(BASELINE, max_concurrent=1, max_queued=1) as hashing:
        stored = await hashing.hash(PASSWORD)
        first = asyncio.create_task(hashing.verify(stored, PASSWORD))
        second = asyncio.create_task(hashing.verify(stored, PASSWORD))
        await asyncio.sleep(0)
        assert hashing.stats() == {
            "running": 1,
            "queued": 1,
            "peak_running": 1,
            "peak_queued": 1,
            "refused": 0,
            "abandoned": 0,
        }
        with pytest.raises(RateLimited) as refusal:
            await hashing.verify(stored, PASSWORD)
        assert not first.done()
        assert refusal.value.reason == "RATE_LIMITED"
        assert refusal.value.retry_after == timedelta(seconds=1)
        assert refusal.value.metadata == {"scope": "hashing"}
        assert await first
        assert await second
        assert hashing.stats() == {
            "running": 0,
            "queued": 0,
            "peak_running": 1,
            "peak_queued": 1,
            "refused": 1,
            "abandoned": 0,
        }


async def test_no_hash_starts_with_too_little_deadline_left(
    hashing: PasswordHashing, argon2_calls: Argon2Calls
) -> None:
    """With 50 ms left (below 200 ms), hash and verify raise DEADLINE_EXCEEDED and start nothing."""
    stored = StoredPassword("$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA", 1)
    with deadline_in(0.05):
        with pytest.raises(DeadlineExceeded):
            await hashing.verify(stored, PASSWORD)
        with pytest.raises(DeadlineExceeded):
            await hashing.hash(PASSWORD)
    assert argon2_calls.hashes == []
    assert hashing.stats() == {
        "running": 0,
        "queued": 0,
        "peak_running": 0,
        "peak_queued": 0,
        "refused": 0,
        "abandoned": 2,
    }


async def test_a_hash_starts_when_enough_deadline_is_left(hashing: PasswordHashing) -> None:
    """With plenty of deadline left the work runs normally."""
    with deadline_in(5.0):
        assert await hashing.verify(await hashing.hash(PASSWORD), PASSWORD)


async def test_the_deadline_is_checked_again_after_waiting_for_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call admitted with enough time left but kept waiting past the margin never starts."""
    slow = Argon2Calls(delay=0.15)
    async with started(max_concurrent=1, max_queued=4) as hashing:
        stored = await hashing.hash(PASSWORD)
        monkeypatch.setattr(passwords_module, "verify_secret", slow.wrap(verify_secret))
        first = asyncio.create_task(hashing.verify(stored, PASSWORD))
        await asyncio.sleep(0)
        with deadline_in(0.3):
            late = asyncio.create_task(hashing.verify(stored, PASSWORD))
        await asyncio.sleep(0)
        assert hashing.stats()["queued"] == 1
        with pytest.raises(DeadlineExceeded):
            await late
        assert await first
        assert len(slow.hashes) == 1
        assert hashing.stats() == {
            "running": 0,
            "queued": 0,
            "peak_running": 1,
            "peak_queued": 1,
            "refused": 0,
            "abandoned": 1,
        }


async def test_cancelling_a_queued_call_starts_nothing_and_frees_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller cancelled while waiting for a slot starts no hash; afterwards the counters are zero."""
    slow = Argon2Calls(delay=0.1)
    async with started(max_concurrent=1, max_queued=4) as hashing:
        stored = await hashing.hash(PASSWORD)
        monkeypatch.setattr(passwords_module, "verify_secret", slow.wrap(verify_secret))
        running = asyncio.create_task(hashing.verify(stored, PASSWORD))
        queued = asyncio.create_task(hashing.verify(stored, PASSWORD))
        await asyncio.sleep(0)
        assert hashing.stats()["queued"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert hashing.stats()["queued"] == 0
        assert await running
        assert len(slow.hashes) == 1
        assert hashing.stats() == {
            "running": 0,
            "queued": 0,
            "peak_running": 1,
            "peak_queued": 1,
            "refused": 0,
            "abandoned": 0,
        }
        assert await hashing.verify(stored, PASSWORD)  # the slot was not lost


async def test_cancelling_a_running_call_keeps_its_slot_until_the_thread_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker thread cannot be stopped, so its slot stays taken until it is done, then frees."""
    slow = Argon2Calls(delay=0.1)
    async with started(max_concurrent=1, max_queued=4) as hashing:
        stored = await hashing.hash(PASSWORD)
        monkeypatch.setattr(passwords_module, "verify_secret", slow.wrap(verify_secret))
        running = asyncio.create_task(hashing.verify(stored, PASSWORD))
        await asyncio.sleep(0.02)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert hashing.stats()["running"] == 1
        await wait_until(lambda: hashing.stats()["running"] == 0)
        assert hashing.stats()["queued"] == 0


async def test_the_event_loop_keeps_ticking_while_hashes_run() -> None:
    """Four realistic-cost hashes run in threads; a 10 ms ticker on the loop is never held up."""
    workers = os.cpu_count() or 1
    async with started(HEAVY, max_concurrent=workers, max_queued=8) as hashing:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.gather(*(hashing.hash(f"{PASSWORD} {n}") for n in range(4)))
        stop.set()
        await ticking
    # One hash blocking the loop would stall it for a whole hash.
    assert max(gaps) < hashing.single_hash_seconds / 2
    assert max(gaps) < 0.08


async def test_single_hash_seconds_is_measured_at_start() -> None:
    """start() times the dummy hash; before start there is no measurement."""
    hashing = PasswordHashing(CHEAP, {1: PEPPER_A}, 1, max_concurrent=1, max_queued=0)
    with pytest.raises(RuntimeError):
        _ = hashing.single_hash_seconds
    await hashing.start()
    try:
        assert hashing.single_hash_seconds > 0
    finally:
        await hashing.close()


async def test_calls_before_start_and_after_close_are_unavailable() -> None:
    """Without a running pool, hash and verify answer UNAVAILABLE instead of hashing on the loop."""
    hashing = PasswordHashing(CHEAP, {1: PEPPER_A}, 1, max_concurrent=1, max_queued=0)
    with pytest.raises(BackendUnavailable):
        await hashing.verify(None, PASSWORD)
    await hashing.start()
    await hashing.close()
    with pytest.raises(BackendUnavailable):
        await hashing.hash(PASSWORD)
    with pytest.raises(BackendUnavailable):
        await hashing.verify(None, PASSWORD)
    assert hashing.stats()["running"] == 0


# --- construction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed",
    [{"memory_kib": 7}, {"time_cost": 0}, {"parallelism": 0}, {"hash_len": 3}, {"salt_len": 4}],
    ids=lambda changed: ",".join(changed),
)
def test_parameters_argon2_cannot_use_are_refused(changed: dict[str, int]) -> None:
    """Argon2Params checks argon2's own minimums when built."""
    with pytest.raises(ValueError, match="Argon2Params"):
        replace(CHEAP, **changed)


@pytest.mark.parametrize(
    ("peppers", "current", "match"),
    [
        ({1: PEPPER_A}, 2, "current_pepper"),
        ({1: b"short"}, 1, "at least 16 bytes"),
    ],
)
def test_inconsistent_peppers_are_refused(peppers: dict[int, bytes], current: int, match: str) -> None:
    """The current pepper must exist and every pepper must be long enough."""
    with pytest.raises(ValueError, match=match):
        PasswordHashing(CHEAP, peppers, current, max_concurrent=1, max_queued=0)


# --- policy ---------------------------------------------------------------------------------------------


def new_problems(password: str, *, email: str = "jo@example.com", names: tuple[str, ...] = ()) -> list[str]:
    return new_password_problems(password, min_length=12, max_length=128, email=email, names=names)


def test_a_long_plain_password_is_fine() -> None:
    """No composition rules: twelve lowercase letters are enough."""
    assert new_problems("abcdefghijkl") == []


def test_new_password_length_boundaries() -> None:
    """min_length and max_length code points are accepted, one fewer or one more is not."""
    assert new_problems("a" * 12) == []
    assert new_problems("a" * 11) == ["must be at least 12 characters"]
    assert new_problems("a" * 128) == []
    assert new_problems("a" * 129) == ["must be at most 128 characters"]


def test_new_password_length_counts_code_points_after_nfkc() -> None:
    """Multibyte characters count once; a ligature counts as the letters NFKC makes of it."""
    assert new_problems("é" * 12) == []
    assert new_problems("\ufb01" * 6) == []  # six "ﬁ" are twelve letters
    assert new_problems("e\u0301" * 11) == ["must be at least 12 characters"]  # composes to 11


def test_new_password_byte_limit_with_multibyte_characters() -> None:
    """At most 512 UTF-8 bytes, whatever max_length allows."""

    def problems(password: str) -> list[str]:
        return new_password_problems(password, min_length=12, max_length=1024, email="jo@x.org", names=())

    assert problems("€" * 170 + "ab") == []  # 510 + 2 bytes
    assert problems("€" * 171) == ["must be at most 512 bytes in UTF-8"]  # 513 bytes, 171 characters
    assert new_problems("😀" * 128) == []  # 128 characters, exactly 512 bytes


def test_new_password_must_not_contain_the_email_local_part() -> None:
    """The part before the @, any case, is refused inside the password."""
    assert new_problems("my-JANE.DOE-pass!", email="jane.doe@example.com") == [
        "must not contain the part of the email address before the @"
    ]
    assert new_problems("my-jane-doe-pass!", email="jane.doe@example.com") == []


def test_a_short_email_local_part_is_not_checked() -> None:
    """Local parts under four characters are too common to forbid."""
    assert new_problems("bobbobbobbobbob", email="bob@example.com") == []
    assert new_problems("xxbobbxxxxxxxx", email="bobb@example.com") != []


def test_new_password_must_not_contain_a_name() -> None:
    """A given name of four or more characters, any case, is refused inside the password."""
    assert new_problems("iloveMARIANNE99", names=("Marianne", "")) == ["must not contain your name"]
    assert new_problems("annannannannann", names=("Ann",)) == []
    assert new_problems("correct horse battery", names=("Marianne", "Smith")) == []


def test_all_new_password_problems_are_reported_together() -> None:
    """Every broken rule appears in the list."""
    assert new_problems("janedoe", email="janedoe@example.com", names=("Jane Doe", "jane")) == [
        "must be at least 12 characters",
        "must not contain the part of the email address before the @",
        "must not contain your name",
    ]


def test_login_password_size_limits() -> None:
    """A presented password needs 1 to 128 code points and no policy."""
    assert login_password_problems("") == ["is required"]
    assert login_password_problems("a") == []
    assert login_password_problems("a" * 128) == []
    assert login_password_problems("a" * 129) == ["must be at most 128 characters"]
    assert login_password_problems("😀" * 128) == []


def test_login_password_is_measured_after_nfkc() -> None:
    """What NFKC makes of the password is what counts, as for the password when it was chosen."""
    assert login_password_problems("e\u0301" * 100) == []  # 200 code points typed, 100 hashed
    assert login_password_problems("\ufdfa" * 8) == ["must be at most 128 characters"]  # 8 -> 144


async def test_hashing_threads_run_below_the_event_loop() -> None:
    """S68: each hashing thread lowers its own priority (Linux nice, per thread), so a login storm
    cannot keep the event loop waiting for a core; the loop's own priority is untouched."""
    loop_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    async with started(CHEAP, max_concurrent=2, max_queued=8) as hashing:
        assert hashing._executor is not None
        in_pool = await asyncio.get_running_loop().run_in_executor(
            hashing._executor, os.getpriority, os.PRIO_PROCESS, 0
        )
    assert in_pool == min(loop_niceness + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop_niceness
