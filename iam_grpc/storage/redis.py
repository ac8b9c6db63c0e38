"""Redis ephemeral store (production). Atomic multi-step operations are Lua
scripts, loaded once and run with EVALSHA (redis-py's ``Script`` retries with
EVAL after a ``NOSCRIPT``, e.g. after a Redis restart)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from iam_grpc.errors import BackendUnavailable

__all__ = ["RedisEphemeral"]

# KEYS[1]; ARGV: expected, new value, ttl ms (0 = keep the current TTL)
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if current == false or current ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
"""

# KEYS[1]; ARGV: amount, ttl ms applied when the counter is new
_INCR_WITH_TTL = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _ms(ttl: timedelta) -> int:
    millis = int(ttl.total_seconds() * 1000)
    if millis <= 0:
        raise ValueError("every ephemeral value needs a positive TTL")
    return millis


class RedisEphemeral:
    """The :class:`~iam_grpc.storage.ports.Ephemeral` port on Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iam:",
        socket_timeout: timedelta = timedelta(milliseconds=250),
        connect_timeout: timedelta = timedelta(seconds=1),
    ) -> None:
        self._prefix = prefix
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout.total_seconds(),
            socket_connect_timeout=connect_timeout.total_seconds(),
            health_check_interval=30,
            retry_on_timeout=False,
        )
        self._cas = self._client.register_script(_COMPARE_AND_SET)
        self._incr = self._client.register_script(_INCR_WITH_TTL)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (for adapters that load their own scripts)."""
        return self._client

    def key(self, key: str) -> str:
        return self._prefix + key

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def ping(self) -> None:
        async with self._guard():
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    async def get(self, key: str) -> bytes | None:
        async with self._guard():
            return _bytes(await self._client.get(self.key(key)))

    async def set(self, key: str, value: bytes, ttl: timedelta) -> None:
        async with self._guard():
            await self._client.set(self.key(key), value, px=_ms(ttl))

    async def set_if_absent(self, key: str, value: bytes, ttl: timedelta) -> bool:
        async with self._guard():
            return bool(await self._client.set(self.key(key), value, px=_ms(ttl), nx=True))

    async def get_and_delete(self, key: str) -> bytes | None:
        async with self._guard():
            return _bytes(await self._client.getdel(self.key(key)))

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
    ) -> bool:
        args: list[Any] = [expected, value, 0 if ttl is None else _ms(ttl)]
        async with self._guard():
            return bool(await self._cas(keys=[self.key(key)], args=args))

    async def incr(self, key: str, amount: int, ttl: timedelta) -> int:
        async with self._guard():
            return int(await self._incr(keys=[self.key(key)], args=[amount, _ms(ttl)]))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        async with self._guard():
            return int(await self._client.delete(*[self.key(k) for k in keys]))

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        async with self._guard(), self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(self.key(key))
            results = await pipe.execute()
        return [bool(result) for result in results]

    async def ttl(self, key: str) -> timedelta | None:
        async with self._guard():
            millis = int(await self._client.pttl(self.key(key)))
        if millis == -2:
            return None
        if millis == -1:
            return timedelta.max  # no TTL: never written by this service
        return timedelta(milliseconds=millis)
