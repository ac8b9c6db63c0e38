"""The dependency breaker (storage/breaker.py): opens after consecutive connection failures, makes
calls fail at once, and closes at its probe's first success."""

from __future__ import annotations

import asyncio

import pytest

from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage.breaker import Breaker


class Dependency:
    def __init__(self) -> None:
        self.up = False
        self.probes = 0

    async def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise BackendUnavailable()


async def test_three_failures_in_a_row_open_it_and_a_probe_closes_it() -> None:
    dependency = Dependency()
    breaker = Breaker("test", dependency.probe, first_pause=0.01, max_pause=0.02)
    changes: list[bool] = []
    breaker.listeners.append(changes.append)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # a success in between: the count starts again
    breaker.failed()
    breaker.failed()
    breaker.allow()  # still closed
    breaker.failed()
    assert breaker.is_open
    with pytest.raises(BackendUnavailable):
        breaker.allow()
    await asyncio.sleep(0.1)
    assert breaker.is_open
    assert dependency.probes >= 3  # one probe at a time, again and again
    dependency.up = True
    for _ in range(50):
        if not breaker.is_open:
            break
        await asyncio.sleep(0.01)
    assert not breaker.is_open
    breaker.allow()
    assert changes == [True, False]
    assert breaker.failed_recently(60)
    await breaker.close()


async def test_a_probe_that_hangs_is_cut_by_its_time_out() -> None:
    released = asyncio.Event()

    async def hangs() -> None:
        await released.wait()

    breaker = Breaker("test", hangs, threshold=1, first_pause=0.01, probe_timeout=0.05)
    breaker.failed()
    await asyncio.sleep(0.2)
    assert breaker.is_open  # the hung probes timed out; still open
    released.set()
    for _ in range(50):
        if not breaker.is_open:
            break
        await asyncio.sleep(0.01)
    assert not breaker.is_open
    await breaker.close()
