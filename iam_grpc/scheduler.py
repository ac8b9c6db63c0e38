"""Background jobs of a running service (key reload, deny-list replay, cleanup, the store health
probe): each runs every interval until the scheduler closes.

A job that fails is logged and runs again at its next turn; one that cannot reach a store only
warns. Random jitter (up to 20% by default) keeps replicas started together from running their
jobs in step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Self

from iam_grpc.background import end_tasks
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger

__all__ = ["Scheduler"]

log = component_logger("iam.app")

_SHORTEST = 0.05  # seconds: a zero interval must not spin
_STOP_GRACE = 10.0  # seconds a cancelled job may take to end


@dataclass(frozen=True, slots=True)
class _Job:
    name: str
    interval: timedelta
    run: Callable[[], Awaitable[object]]
    jitter: float


class Scheduler:
    """``every(...)`` registers jobs; ``async with`` runs them, and leaving cancels them."""

    def __init__(self) -> None:
        self._jobs: list[_Job] = []
        self._tasks: list[asyncio.Task[None]] = []

    def every(
        self, name: str, interval: timedelta, job: Callable[[], Awaitable[object]], *, jitter: float = 0.2
    ) -> None:
        self._jobs.append(_Job(name, interval, job, jitter))

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(job), name=job.name) for job in self._jobs]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Cancel every job and wait for it (a job in the middle of a pass is interrupted), at most
        :data:`_STOP_GRACE` seconds: a job that swallowed its cancellation is left behind."""
        await end_tasks(self._tasks, grace=_STOP_GRACE)
        self._tasks.clear()

    async def _loop(self, job: _Job) -> None:
        seconds = max(job.interval.total_seconds(), _SHORTEST)
        while True:
            await asyncio.sleep(seconds * (1 + random.random() * job.jitter))  # noqa: S311 - spreading load, not security
            try:
                await job.run()
            except BackendUnavailable:
                log.bind(job=job.name).warning("background job could not reach a store")
            except Exception:
                log.bind(job=job.name).exception("background job failed")
