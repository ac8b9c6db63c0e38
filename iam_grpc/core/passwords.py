"""Hashing and verifying passwords: argon2id in a bounded thread pool, peppered, with a dummy hash.

Why a pool. One argon2id hash at the baseline parameters costs tens of
milliseconds of CPU and about 19 MiB of memory. On the event loop it would
stall every other RPC of the process for that long. argon2-cffi releases the
GIL while the C code runs, so a dedicated ``ThreadPoolExecutor`` with one
worker per allowed concurrent hash gives real parallelism while the loop keeps
serving token checks. We count the slots ourselves instead of letting the
executor queue: its internal queue is unbounded, and during a login storm it
would pile up work whose callers gave up long ago. So at most ``max_queued``
calls wait for a slot, the next one is refused at once with RATE_LIMITED, and a
call whose deadline is nearly spent never starts a hash (DEADLINE_EXCEEDED): the
CPU goes to calls that can still succeed. A slot is freed when the worker
thread has really finished, not when its caller stops waiting, so a cancelled
caller cannot make the pool look idler than it is.

Why a dummy hash. At start-up we hash a random password with the configured
parameters. Every verification that has no usable real hash (unknown email, a
stored hash that cannot be parsed, a pepper id that is no longer configured)
verifies against the dummy instead, so each of them costs one argon2
verification like a real one, and the response time does not tell an attacker
which emails have accounts. Its duration is also our measurement of what one
hash costs on this machine.

Why a pepper, and why through HMAC. The argon2 input is
``HMAC-SHA256(pepper, NFKC(password))`` with the pepper kept outside the
database, so a leaked users table alone cannot be attacked offline. HMAC is a
keyed PRF with a fixed 32-byte output: it cannot be undone without the key,
it needs no separator or length rules (unlike concatenation), and it keeps the
stored value a standard PHC string that any argon2 implementation can check.
Each row records its ``pepper_id``; retired peppers stay configured for
verification and :meth:`PasswordHashing.needs_rehash` moves a user to the
current one at the next successful login. NFKC first, so that the same password
typed through different keyboards or input methods (full-width digits, composed
or decomposed accents) gives the same bytes.

Nothing here logs a password, a hash or a pepper; log lines carry at most a
pepper id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from functools import partial
from typing import Any, Self, TypeVar

from argon2 import Parameters, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import ARGON2_VERSION, hash_secret, verify_secret

from iam_grpc.core.call import remaining
from iam_grpc.core.password_policy import login_password_problems, new_password_problems
from iam_grpc.errors import BackendUnavailable, DeadlineExceeded, RateLimited
from iam_grpc.logging import component_logger

# The policy functions live in password_policy (pure text rules, no argon2); re-exported for callers
# that import everything password-related from here.
__all__ = [
    "Argon2Params",
    "PasswordHashing",
    "StoredPassword",
    "login_password_problems",
    "new_password_problems",
]

_log = component_logger("iam.passwords")
_T = TypeVar("_T")
_MIN_PEPPER_BYTES = 16
_PHC_PREFIX = "$argon2id$"


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """argon2id cost parameters; checked against argon2's own limits when built.

    The service's floor (``config.ARGON2_FLOOR``) is enforced by the settings,
    not here, so tests and benchmarks may use cheaper values.
    """

    memory_kib: int
    time_cost: int
    parallelism: int
    hash_len: int
    salt_len: int

    def __post_init__(self) -> None:
        for name in ("memory_kib", "time_cost", "parallelism", "hash_len", "salt_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Argon2Params.{name} must be an int")
        if not 1 <= self.parallelism <= 0xFFFFFF:
            raise ValueError("Argon2Params.parallelism must be between 1 and 2**24 - 1")
        if self.memory_kib < 8 * self.parallelism:
            raise ValueError("Argon2Params.memory_kib must be at least 8 times parallelism")
        if self.time_cost < 1:
            raise ValueError("Argon2Params.time_cost must be at least 1")
        if self.hash_len < 4:
            raise ValueError("Argon2Params.hash_len must be at least 4")
        if self.salt_len < 8:
            raise ValueError("Argon2Params.salt_len must be at least 8")

    def as_argon2(self) -> Parameters:
        """The same parameters as argon2-cffi describes a parsed hash (argon2id, current version)."""
        return Parameters(
            type=Type.ID,
            version=ARGON2_VERSION,
            salt_len=self.salt_len,
            hash_len=self.hash_len,
            time_cost=self.time_cost,
            memory_cost=self.memory_kib,
            parallelism=self.parallelism,
        )


@dataclass(frozen=True, slots=True)
class StoredPassword:
    """A password as the users table keeps it."""

    phc: str  # argon2id PHC string (users.password_hash)
    pepper_id: int | None  # users.pepper_id; None: no pepper was applied

    def __repr__(self) -> str:
        return f"StoredPassword(phc=<{len(self.phc)} chars>, pepper_id={self.pepper_id!r})"


class _Outcome(Enum):
    MATCH = "match"
    MISMATCH = "mismatch"
    UNREADABLE = "unreadable"  # argon2 could not decode the stored hash; the dummy was checked instead


# --- work done in the pool's threads -------------------------------------------------------------


def _argon2_input(password: str, pepper: bytes | None) -> bytes:
    # surrogatepass: a lone surrogate must not turn into an exception deep in a worker.
    data = unicodedata.normalize("NFKC", password).encode("utf-8", "surrogatepass")
    if pepper is None:
        return data
    return hmac.new(pepper, data, hashlib.sha256).digest()


def _hash_blocking(params: Argon2Params, password: str, pepper: bytes | None) -> tuple[str, float]:
    """Hash; return the PHC string and the seconds the argon2 call took."""
    secret = _argon2_input(password, pepper)
    started = time.perf_counter()
    encoded = hash_secret(
        secret=secret,
        salt=secrets.token_bytes(params.salt_len),
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        type=Type.ID,
    )
    return encoded.decode("ascii"), time.perf_counter() - started


def _verify_blocking(target: bytes | None, password: str, pepper: bytes | None, dummy: bytes) -> _Outcome:
    """Verify against ``target``, or against ``dummy`` when there is none or it cannot be decoded."""
    secret = _argon2_input(password, pepper)
    if target is not None:
        try:
            verify_secret(target, secret, Type.ID)
        except VerifyMismatchError:
            return _Outcome.MISMATCH
        except (VerificationError, ValueError, TypeError):
            pass  # decoding failed early and cheaply: pay for one verification below
        else:
            return _Outcome.MATCH
    with suppress(VerificationError):  # the dummy never matches; only its cost matters
        verify_secret(dummy, secret, Type.ID)
    return _Outcome.MISMATCH if target is None else _Outcome.UNREADABLE


def _readable_phc(phc: str) -> bytes | None:
    """The PHC string as bytes for argon2 if it looks like an argon2id hash, else None."""
    if not phc.isascii() or not phc.startswith(_PHC_PREFIX) or "\x00" in phc:
        return None
    try:
        extract_parameters(phc)
    except (InvalidHashError, ValueError):
        return None
    return phc.encode("ascii")


# --- the service -----------------------------------------------------------------------------------


# How much lower than the event loop a hashing thread runs (Linux nice increment, per thread).
_HASH_NICENESS = 10


def _yield_to_the_loop() -> None:
    """Run this hashing thread at a lower priority than the event loop (security.md S68): with as
    many hashing threads as cores, the loop would otherwise wait for the scheduler behind them and
    token checks would stall during a login storm. Hashes still use every idle cycle. On Linux a
    thread has its own nice value (``setpriority(PRIO_PROCESS, 0)`` changes the calling thread
    only); elsewhere it would change the whole process, so nothing is done."""
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + _HASH_NICENESS)
    except OSError:
        _log.warning("could not lower the priority of a hashing thread")


class PasswordHashing:
    """Hashes and verifies passwords in a bounded pool; see the module docstring for the design.

    ``peppers`` maps pepper id to secret; ``current_pepper`` (None: no pepper)
    is used for new hashes. At most ``max_concurrent`` hashes run at once and
    at most ``max_queued`` calls wait for one; no hash starts with less than
    ``min_deadline`` left before the current call's deadline.
    """

    def __init__(
        self,
        params: Argon2Params,
        peppers: Mapping[int, bytes],
        current_pepper: int | None,
        *,
        max_concurrent: int,
        max_queued: int,
        min_deadline: timedelta = timedelta(milliseconds=200),
    ) -> None:
        for pepper_id, secret in peppers.items():
            if not isinstance(secret, bytes) or len(secret) < _MIN_PEPPER_BYTES:
                raise ValueError(f"pepper {pepper_id} must be at least {_MIN_PEPPER_BYTES} bytes")
        if current_pepper is not None and current_pepper not in peppers:
            raise ValueError("current_pepper must name one of the peppers")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if max_queued < 0:
            raise ValueError("max_queued must not be negative")
        if min_deadline < timedelta(0):
            raise ValueError("min_deadline must not be negative")
        self._params = params
        self._expected = params.as_argon2()
        self._peppers: dict[int, bytes] = dict(peppers)
        self._current_pepper = current_pepper
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._min_deadline = min_deadline.total_seconds()
        self._executor: ThreadPoolExecutor | None = None
        self._dummy: bytes | None = None
        self._single_hash_seconds: float | None = None
        # Slot accounting, touched only from the event loop thread.
        self._free = max_concurrent
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._refused = 0
        self._abandoned = 0
        self._peak_running = 0
        self._peak_queued = 0

    # lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Create the pool and compute the dummy hash in it (a random password, current parameters)."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(
            max_workers=self._max_concurrent, thread_name_prefix="iam-argon2", initializer=_yield_to_the_loop
        )
        work = partial(_hash_blocking, self._params, secrets.token_urlsafe(32), self._current_key())
        try:
            phc, seconds = await asyncio.get_running_loop().run_in_executor(executor, work)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._dummy = phc.encode("ascii")
        self._single_hash_seconds = seconds
        self._executor = executor

    async def close(self) -> None:
        """Refuse new work and shut the pool down, waiting for the hashes already running."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # hashing ------------------------------------------------------------------

    async def hash(self, password: str) -> StoredPassword:
        """Hash a new password with the configured parameters and the current pepper."""
        phc, _seconds = await self._run(partial(_hash_blocking, self._params, password, self._current_key()))
        return StoredPassword(phc=phc, pepper_id=self._current_pepper)

    async def verify(self, stored: StoredPassword | None, password: str) -> bool:
        """True if ``password`` matches ``stored``. Every path costs one argon2 verification:
        ``None`` (no such user), an unknown pepper id and an unreadable hash check the dummy
        and return False."""
        dummy = self._dummy
        if dummy is None:
            raise BackendUnavailable()
        pepper = self._current_key()
        target: bytes | None = None
        if stored is not None:
            if stored.pepper_id is not None and stored.pepper_id not in self._peppers:
                _log.bind(pepper_id=stored.pepper_id).warning("stored password uses an unknown pepper")
            else:
                pepper = None if stored.pepper_id is None else self._peppers[stored.pepper_id]
                target = _readable_phc(stored.phc)
                if target is None:
                    _log.warning("stored password hash is unreadable")
        outcome = await self._run(partial(_verify_blocking, target, password, pepper, dummy))
        if outcome is _Outcome.UNREADABLE:
            _log.warning("stored password hash is unreadable")
        return outcome is _Outcome.MATCH

    def needs_rehash(self, stored: StoredPassword) -> bool:
        """True if ``stored`` was made with other parameters (memory, time, parallelism, hash and
        salt length, type, version) than configured, or with a pepper other than the current one."""
        if stored.pepper_id != self._current_pepper:
            return True
        try:
            return extract_parameters(stored.phc) != self._expected
        except ValueError:  # InvalidHashError included: whatever it is, a fresh hash is better
            return True

    @property
    def single_hash_seconds(self) -> float:
        """How long the dummy hash took at start(): one hash with the configured parameters."""
        if self._single_hash_seconds is None:
            raise RuntimeError("PasswordHashing.start() has not run")
        return self._single_hash_seconds

    def stats(self) -> dict[str, int]:
        """For metrics: hashes running now, calls waiting for a slot, the most of each seen since
        start, and totals of calls refused because the queue was full and abandoned because the
        deadline was too close."""
        return {
            "running": self._max_concurrent - self._free,
            "queued": len(self._waiters),
            "peak_running": self._peak_running,
            "peak_queued": self._peak_queued,
            "refused": self._refused,
            "abandoned": self._abandoned,
        }

    # internals ----------------------------------------------------------------

    def _current_key(self) -> bytes | None:
        return None if self._current_pepper is None else self._peppers[self._current_pepper]

    async def _run(self, work: Callable[[], _T]) -> _T:
        self._check_deadline()  # not worth a queue place if it could never start
        await self._acquire()
        try:
            self._check_deadline()
            executor = self._executor
            if executor is None:
                raise BackendUnavailable()
            future = asyncio.get_running_loop().run_in_executor(executor, work)
        except BaseException:
            self._release()
            raise
        # The slot belongs to the thread until it finishes, even if our caller is cancelled.
        future.add_done_callback(self._work_done)
        self._peak_running = max(self._peak_running, self._max_concurrent - self._free)
        return await asyncio.shield(future)

    def _check_deadline(self) -> None:
        left = remaining()
        if left is not None and left < self._min_deadline:
            self._abandoned += 1
            raise DeadlineExceeded()

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._max_queued:
            self._refused += 1
            raise RateLimited(timedelta(seconds=1), "hashing")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._peak_queued = max(self._peak_queued, len(self._waiters))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as we were cancelled: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        """Hand the slot to the longest waiter still waiting, or give it back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _work_done(self, future: asyncio.Future[Any]) -> None:
        self._release()
        if not future.cancelled():
            future.exception()  # mark retrieved: a caller cancelled mid-hash no longer awaits it
