"""Ending background loops at shutdown (``iam_grpc.background.end_tasks``): asked loops end on
their own, deaf ones are cancelled, and one that swallows its cancellation is left behind within
the grace instead of holding the shutdown forever."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from loguru import logger

from iam_grpc.background import WokenLoop, end_tasks


async def test_an_asked_loop_ends_after_its_pass_without_being_cancelled() -> None:
    stopping = asyncio.Event()
    passes: list[str] = []

    async def loop() -> None:
        while not stopping.is_set():
            passes.append("pass")
            await asyncio.sleep(0.01)
        passes.append("ended on its own")

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    await end_tasks([task], grace=5, ask=stopping.set)
    assert task.done()
    assert not task.cancelled()
    assert passes[-1] == "ended on its own"


async def test_a_loop_that_does_not_listen_is_cancelled_after_the_grace() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    started = time.monotonic()
    await end_tasks([task, None], grace=0.2, ask=lambda: None)
    assert task.cancelled()
    assert 0.2 <= time.monotonic() - started < 2


async def test_a_loop_that_swallows_its_cancellation_is_left_behind_with_an_error() -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # the defect end_tasks guards against
                await asyncio.sleep(0.01)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.03)  # inside its loop (a task cancelled before it starts just ends)
    logs: list[dict[str, Any]] = []
    sink = logger.add(lambda message: logs.append(dict(message.record)), level="ERROR")
    try:
        started = time.monotonic()
        await end_tasks([task], grace=0.2)
        elapsed = time.monotonic() - started
        still_running = not task.done()
    finally:
        logger.remove(sink)
        released.set()
        await task
    assert elapsed < 2  # the shutdown went on
    assert still_running
    assert [r["extra"].get("task") for r in logs if r["level"].name == "ERROR"] == ["stubborn"]


async def test_a_failed_loop_is_no_error_at_shutdown() -> None:
    async def failing() -> None:
        raise RuntimeError("failed earlier, logged by the loop itself")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await end_tasks([task], grace=1)
    assert task.done()


async def test_a_woken_loop_sleeps_until_woken_runs_again_when_told_and_survives_a_failed_pass() -> None:
    """WokenLoop: a pass, then the interval's sleep that wake() cuts short; a pass answering True
    is followed by the next at once; a pass that raises is logged and the loop sleeps and goes on; stop()
    ends it between passes, without a cancellation."""
    passes: list[str] = []
    plan = ["more", "idle", "fail", "idle"]

    async def one_pass() -> bool:
        step = plan.pop(0) if plan else "idle"
        passes.append(step)
        if step == "fail":
            raise RuntimeError("a pass failed")
        return step == "more"

    loop = WokenLoop("test-loop", one_pass, 3600.0, grace=5)
    logs: list[dict[str, Any]] = []
    sink = logger.add(lambda message: logs.append(dict(message.record)), level="ERROR")
    try:
        loop.start()
        await asyncio.sleep(0.05)
        assert passes == ["more", "idle"]  # "more" went on at once, "idle" sleeps the hour
        loop.wake()
        await asyncio.sleep(0.05)
        assert passes == ["more", "idle", "fail"]  # woken long before the hour
        loop.wake()
        await asyncio.sleep(0.05)
        assert passes == ["more", "idle", "fail", "idle"]  # the failure did not end the loop
        started = time.monotonic()
        await loop.stop()
    finally:
        logger.remove(sink)
    assert time.monotonic() - started < 1
    assert loop.stopping
    assert [r["extra"].get("task") for r in logs] == ["test-loop"]
