"""Cost of one rate-limit union check (issue 3), in process and on Redis.

Usage: python bench/ratelimit.py [--n N]

Times ``RateLimiter.hit`` on the `login.ip` group (two windows: 10/1s + 100/10m)
and on `reset_request.ip` (three windows), sequentially, one key per 50 calls
(so most calls pass), with the injected clock fixed. Also measures the in-process
store when full of protected keys (the eviction path). Prints µs per check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import time
from datetime import timedelta

from iam_grpc.clock import SystemClock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit import DEFAULT_GROUPS, RateLimiter
from iam_grpc.errors import RateLimited
from iam_grpc.metrics import Metrics
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore
from iam_grpc.storage.ports import LimiterStore
from iam_grpc.storage.redis import RedisEphemeral, RedisLimiterStore

REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def per_check_us(store: LimiterStore, group: str, n: int) -> float:
    limiter = RateLimiter(
        store,
        groups=DEFAULT_GROUPS,
        material=SecretMaterial(bytes(32)),
        clock=SystemClock(),
        metrics=Metrics(),
    )
    keys = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(n // 50 + 1)]
    for key in keys[:20]:  # warm up (script loading, connections)
        await limiter.hit(group, key)
    started = time.perf_counter()
    for i in range(n):
        with contextlib.suppress(RateLimited):
            await limiter.hit(group, keys[i // 50])
    return (time.perf_counter() - started) / n * 1e6


async def concurrent_checks_per_second(store: LimiterStore, n: int, tasks: int = 50) -> float:
    limiter = RateLimiter(
        store,
        groups=DEFAULT_GROUPS,
        material=SecretMaterial(bytes(32)),
        clock=SystemClock(),
        metrics=Metrics(),
    )

    async def worker(w: int) -> None:
        for i in range(n // tasks):
            with contextlib.suppress(RateLimited):
                await limiter.hit("login.ip", f"10.9.{w}.{i % 200}")

    await worker(999)  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    return n / (time.perf_counter() - started)


async def main() -> None:
    from loguru import logger

    logger.remove()  # block warnings would drown the numbers
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    results: dict[str, object] = {}
    for group in ("login.ip", "reset_request.ip"):
        memory = MemoryEphemeral(max_keys=200_000)
        results[f"memory_{group}_us"] = round(await per_check_us(MemoryLimiterStore(memory), group, n), 1)
        redis = RedisEphemeral(REDIS, prefix=f"iam_bench_{secrets.token_hex(3)}:")
        try:
            results[f"redis_{group}_us"] = round(await per_check_us(RedisLimiterStore(redis), group, n), 1)
            if group == "login.ip":
                rate = await concurrent_checks_per_second(RedisLimiterStore(redis), n)
                results["redis_login.ip_checks_per_s_50_concurrent"] = round(rate)
        finally:
            keys = [k async for k in redis.client.scan_iter(match=redis.prefix + "*")]
            if keys:
                await redis.client.delete(*keys)
            await redis.close()
    full = MemoryEphemeral(max_keys=200_000)
    for i in range(199_000):
        await full.set(f"link:used:{i}", b"1", timedelta(hours=1))
    results["memory_full_store_login.ip_us"] = round(
        await per_check_us(MemoryLimiterStore(full), "login.ip", n), 1
    )
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results["n"] = n
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
