"""The deny-list's change feed on Redis (:class:`~iam_grpc.storage.ports.DenyFeed`): a stream
``{deny}:feed`` in the slot of the entries and their generation marker, trimmed by age
(:data:`RETENTION`), so a read of the marker and of the changes is one pipeline on every topology.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage.loop_lag import patient_timeout
from iam_grpc.storage.ports import DENY_TAG
from iam_grpc.storage.redis import RedisEphemeral

__all__ = ["FEED_KEY", "RETENTION", "RedisDenyFeed"]

FEED_KEY = f"{DENY_TAG}:feed"
RETENTION = timedelta(minutes=10)  # a reader away longer than half this reloads in full
_READ_COUNT = 1000
_PAUSE = 0.05  # between tries of a publication


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDenyFeed:
    def __init__(self, redis: RedisEphemeral) -> None:
        self._redis = redis
        self._key = redis.key(FEED_KEY)

    async def publish(self, keys: Sequence[str], *, within: timedelta) -> None:
        """Past the breaker (a breaker opened by a short stall must not lose a change): tried
        again until Redis takes it or ``within`` has passed (then BackendUnavailable)."""
        if not keys:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within.total_seconds()
        retention = int(RETENTION.total_seconds() * 1000)
        while True:
            oldest = int(time.time() * 1000) - retention
            try:
                client = self._redis.client
                budget = self._redis.call_budget
                async with patient_timeout(budget), client.pipeline(transaction=False) as pipe:
                    pipe.xadd(self._key, {"k": "\n".join(keys)}, minid=str(oldest), approximate=True)
                    pipe.pexpire(self._key, retention)
                    await pipe.execute()
                return
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                if loop.time() >= deadline:
                    raise BackendUnavailable() from exc
            await asyncio.sleep(_PAUSE)

    async def head(self) -> str:
        async with self._redis.guard():
            newest = await self._redis.client.xrevrange(self._key, "+", "-", count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def read(self, cursor: str, with_value: str) -> tuple[bytes | None, str, list[str]]:
        client = self._redis.client
        keys: list[str] = []
        async with self._redis.guard(), client.pipeline(transaction=False) as pipe:
            pipe.get(self._redis.key(with_value))
            pipe.xread({self._key: cursor}, count=_READ_COUNT)
            value, answer = await pipe.execute()
        cursor, count = _collect(answer, cursor, keys)
        while count >= _READ_COUNT:  # more than one batch behind: read on
            async with self._redis.guard():
                answer = await client.xread({self._key: cursor}, count=_READ_COUNT)
            cursor, count = _collect(answer, cursor, keys)
        return (value.encode() if isinstance(value, str) else value), cursor, keys


def _collect(answer: Any, cursor: str, keys: list[str]) -> tuple[str, int]:
    """Append the keys of an XREAD answer (RESP2 list or RESP3 map); the new cursor, the count."""
    streams = answer.items() if isinstance(answer, dict) else (answer or [])
    count = 0
    for _name, entries in streams:
        for entry_id, fields in entries:
            cursor = _text(entry_id)
            count += 1
            raw = fields.get(b"k", fields.get("k", b"")) if isinstance(fields, dict) else b""
            keys.extend(k for k in _text(raw).split("\n") if k)
    return cursor, count
