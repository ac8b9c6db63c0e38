"""Time-outs that a late event loop cannot trip (issue 14, "no false outages").

On a saturated loop (dozens of calls queued, the cores shared) a dependency's answer can sit in
the socket for a few hundred milliseconds before the loop reads it; a plain ``asyncio.timeout``
or a socket time-out then fires although the dependency answered in time, and the caller counts
a failure that did not happen (a deny-list fallback, a breaker step, a failed readiness probe).

:func:`patient_timeout` is ``asyncio.timeout(budget)`` that does not count the time the loop
itself was late: when it would fire, it asks the loop's :class:`LoopLag` monitor how late the
loop ran while the wait lasted, and moves the deadline by that much (up to ``cap`` in all).
On an idle loop it fires exactly at ``budget``, so a stalled dependency is still noticed as fast
as before.

The monitor is a callback that reschedules itself every :data:`TICK` seconds on the running
loop and adds up how late each tick ran; it starts at the first :func:`patient_timeout` on a
loop and ends with the loop (a plain timer handle: nothing to cancel or await).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["TICK", "LoopLag", "patient_timeout"]

TICK = 0.02  # seconds between the monitor's ticks: lag is known to within this
_IDLE_STOP = 30.0  # the monitor stops ticking after this long without a patient_timeout


class LoopLag:
    """How late one event loop runs its callbacks, summed since the monitor started."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._total = 0.0
        self._due = 0.0
        self._last_use = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.worst = 0.0  # the largest single lag seen (for metrics and tests)

    def ensure_running(self) -> None:
        now = self._loop.time()
        self._last_use = now
        if self._handle is None:
            self._due = now + TICK
            self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        late = max(0.0, now - self._due)
        self._total += late
        self.worst = max(self.worst, late)
        if now - self._last_use > _IDLE_STOP:
            self._handle = None
            return
        self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)

    def total(self) -> float:
        """Seconds of lateness so far, including the tick that is overdue right now."""
        pending = self._loop.time() - self._due if self._handle is not None else 0.0
        return self._total + max(0.0, pending)


_MONITORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = weakref.WeakKeyDictionary()


def loop_lag() -> LoopLag:
    """The running loop's monitor (started if needed)."""
    loop = asyncio.get_running_loop()
    monitor = _MONITORS.get(loop)
    if monitor is None:
        monitor = _MONITORS[loop] = LoopLag(loop)
    monitor.ensure_running()
    return monitor


@asynccontextmanager
async def patient_timeout(budget: float, *, cap: float | None = None) -> AsyncIterator[None]:
    """Raise TimeoutError when the awaited work took more than ``budget`` seconds of the time the
    loop was on time, or ``cap`` seconds in all (default: ten budgets, at least 5 s)."""
    loop = asyncio.get_running_loop()
    lag = loop_lag()
    start = loop.time()
    lag_at_start = lag.total()
    limit = start + (cap if cap is not None else max(10 * budget, 5.0))
    async with asyncio.timeout(None) as timeout:
        handles: list[asyncio.TimerHandle] = []

        def check() -> None:
            now = loop.time()
            owed = lag.total() - lag_at_start  # how late the loop ran during the wait
            due = start + budget + owed
            if now >= due - 0.001 or now >= limit:
                timeout.reschedule(now)  # fires: the dependency itself was slow
                return
            handles[0] = loop.call_at(min(due, limit), check)

        handles.append(loop.call_at(start + budget, check))
        try:
            yield
        finally:
            handles[0].cancel()
