"""patient_timeout: a late event loop is not a slow dependency (issue 14)."""

from __future__ import annotations

import asyncio
import time

import pytest

from iam_grpc.storage.loop_lag import loop_lag, patient_timeout


async def test_on_an_idle_loop_it_fires_at_its_budget() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with patient_timeout(0.1):
            await asyncio.sleep(5)
    assert 0.09 <= time.monotonic() - started < 0.5


async def test_an_answer_that_arrived_in_time_survives_a_late_loop() -> None:
    """The answer is there after 50 ms, but the loop is blocked for 300 ms from 10 ms: a plain
    asyncio.timeout(0.1) cuts it; the patient one lets it through."""
    loop = asyncio.get_running_loop()

    async def answer_with_loop_blocked(timeout_cm: object) -> str:
        answer: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.05, answer.set_result, "pong")
        loop.call_later(0.01, time.sleep, 0.3)
        async with timeout_cm:  # type: ignore[attr-defined]
            return await answer

    with pytest.raises(TimeoutError):
        await answer_with_loop_blocked(asyncio.timeout(0.1))
    assert await answer_with_loop_blocked(patient_timeout(0.1)) == "pong"
    assert loop_lag().worst >= 0.25


async def test_the_cap_ends_any_wait() -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with patient_timeout(0.05, cap=0.4):
            while True:  # the loop is late all the time: only the cap ends this
                loop.call_soon(time.sleep, 0.06)
                await asyncio.sleep(0)
    assert time.monotonic() - started < 1.0
