"""Ending background loops at shutdown without ever waiting for them forever.

A loop (outbox sender, event poller, webhook and NATS publishers, scheduled jobs, deny-list
followers) is first asked to stop: its flag is set and it is woken, so it ends after the pass in
hand, not inside a query. Only a loop that has not ended within the grace is cancelled; and one
that does not end within a second grace after that (a cancellation swallowed somewhere below it)
is left behind with an error in the log: the service's shutdown goes on. Before this, the exit
of a publisher awaited its cancelled task, which had swallowed the cancellation and slept on,
and the service never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from iam_grpc.logging import component_logger

__all__ = ["WokenLoop", "end_tasks"]

log = component_logger("iam_grpc.background")


async def end_tasks(
    tasks: Iterable[asyncio.Task[Any] | None],
    *,
    grace: float,
    ask: Callable[[], None] | None = None,
) -> None:
    """``ask()`` the loops to end (flag and wake-up), wait up to ``grace`` seconds, cancel the
    ones still running and wait up to ``grace`` again. Never raises for the tasks' outcomes."""
    given = [task for task in tasks if task is not None]
    pending = {task for task in given if not task.done()}
    if ask is not None:
        ask()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
    for task in pending:
        task.cancel()
    if pending:
        _, pending = await asyncio.wait(pending, timeout=grace)
    for task in pending:
        log.bind(task=task.get_name()).error("a background task did not end when cancelled; left behind")
    for task in (t for t in given if t.done() and not t.cancelled()):
        with contextlib.suppress(Exception):
            task.result()  # retrieved: no "exception was never retrieved" at exit


class WokenLoop:
    """A background loop: one pass, then a sleep of ``interval`` seconds that :meth:`wake` cuts
    short. A pass that answers True (more work is waiting) is followed by the next at once. Asked
    to stop, the loop ends between passes (never inside a query); it is cancelled only past the
    grace (:func:`end_tasks`). A pass handles the failures it expects; anything else is logged
    here and the loop goes on."""

    def __init__(
        self, name: str, one_pass: Callable[[], Awaitable[bool | None]], interval: float, *, grace: float
    ) -> None:
        self._name = name
        self._pass = one_pass
        self._interval = interval
        self._grace = grace
        self._woken = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._woken.set()

    @property
    def stopping(self) -> bool:
        """Whether the loop was asked to end (a long pass checks it between its items)."""
        return self._stopping

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        await end_tasks([self._task], grace=self._grace, ask=self._ask_to_stop)
        self._task = None

    def _ask_to_stop(self) -> None:
        self._stopping = True
        self._woken.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                more = await self._pass()
            except Exception:
                log.bind(task=self._name).exception("background pass failed")
                more = False
            if more or self._stopping:
                continue
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation that
            # ends this loop past its grace when the wake-up lands at the same moment
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._woken.wait()
            self._woken.clear()
