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
from collections.abc import Callable, Iterable
from typing import Any

from iam_grpc.logging import component_logger

__all__ = ["end_tasks"]

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
