"""Redis ephemeral store (production), on one server, behind Sentinel or on a Redis Cluster
(:mod:`iam_grpc.storage.redis_topology` builds the client the URL names). Atomic multi-step
operations are Lua scripts, loaded once and run with EVALSHA (redis-py's ``Script`` retries with
EVAL after a ``NOSCRIPT``, e.g. after a Redis restart).

Every command and script is slot-safe, so a Cluster runs what one server runs: each script
touches exactly one key (``KEYS[1]``) and reads no server clock (times come from the caller);
MGET (:meth:`RedisEphemeral.get_many`) refuses keys of different hash tags on every topology,
so a caller that would break a Cluster fails its tests on one server too; the pipelines of
separate commands (``values``, ``exists``, ``set_many``) and DEL are split per node by the
Cluster client, one round trip per node, in parallel. Nothing scans keys.

Connection loss is handled in three layers: a command that meets a dead pooled
connection (Redis restarted) reconnects and is sent once more (never after a
time-out: a stalled Redis would double every wait); a :class:`Breaker` makes
calls fail at once while Redis is known down, so callers take their fallbacks
without waiting; and each new connection reads the server's ``run_id``, so a
restart or a failover to another server is noticed before the first command on
it (listeners in :attr:`RedisEphemeral.server_listeners`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from iam_grpc.errors import BackendUnavailable
from iam_grpc.storage import sliding_window
from iam_grpc.storage.breaker import Breaker
from iam_grpc.storage.loop_lag import patient_timeout
from iam_grpc.storage.ports import DENY_TAG, one_hash_tag
from iam_grpc.storage.records import HitResult, LimitSpec
from iam_grpc.storage.redis_topology import connect

__all__ = ["RedisEphemeral", "RedisLimiterStore"]

_BATCH = 1000  # commands per pipeline round trip in set_many
# A server (or every node a cluster client knows) that cannot be reached. RedisClusterException is
# what the cluster client raises when no seed node answers.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)
_WAIT_PAUSE = 0.05  # between tries of set_many_waiting


def _refused(exc: BaseException) -> bool:
    """Whether a connection was refused (redis-py keeps the OSError as the context)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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

# KEYS[1]; ARGV: expected
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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
    """The :class:`~iam_grpc.storage.ports.Ephemeral` port on Redis: one server, Sentinel or
    Cluster, as ``url`` says (:mod:`iam_grpc.storage.redis_topology`)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iam:",
        socket_timeout: timedelta = timedelta(milliseconds=250),
        connect_timeout: timedelta = timedelta(seconds=1),
        health_check_interval: timedelta = timedelta(seconds=10),
    ) -> None:
        self._prefix = prefix
        # ``socket_timeout`` is the budget of one guarded call, not counting the time the event
        # loop itself was late (loop_lag.patient_timeout): a saturated loop must not turn Redis
        # answers that arrived in time into failures. redis-py's own socket time-out is only the
        # backstop (the patient time-out's cap).
        self._budget = socket_timeout.total_seconds()
        self._connect_budget = connect_timeout.total_seconds()
        self._backstop = max(10 * self._budget, 5.0)
        self._topology = connect(
            url,
            socket_timeout=timedelta(seconds=self._backstop + 1.0),
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            home_tag=DENY_TAG,
        )
        self._client = self._topology.client
        if self._topology.kind == "cluster":
            # one call may follow a redirection, refresh the slot map and reconnect to a node
            self._budget += self._connect_budget
        self._cas = self._client.register_script(_COMPARE_AND_SET)
        self._delete_if = self._client.register_script(_DELETE_IF)
        self._incr = self._client.register_script(_INCR_WITH_TTL)
        self.breaker = Breaker("redis", self._probe)
        self.server_listeners: list[Callable[[str], None]] = []
        self._topology.listeners.append(self._server_changed)

    def _server_changed(self, run_id: str) -> None:
        for listener in self.server_listeners:
            listener(run_id)

    @property
    def topology(self) -> str:
        """``single``, ``sentinel`` or ``cluster``."""
        return self._topology.kind

    @property
    def server_id(self) -> str:
        """The run_id of the Redis server holding the deny-list's slot ("" before the first
        connection): the only server behind one URL or Sentinel, the primary serving the slot of
        :data:`~iam_grpc.storage.ports.DENY_TAG` on a Cluster."""
        return self._topology.server_id

    @property
    def call_budget(self) -> float:
        """Seconds one call may take, not counting the event loop's lateness."""
        return self._budget

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The underlying client (for adapters that load their own scripts)."""
        return self._client

    def key(self, key: str) -> str:
        return self._prefix + key

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn any Redis or socket failure into BackendUnavailable; fail at once while the
        breaker is open."""
        self.breaker.allow()
        try:
            async with patient_timeout(self._budget, cap=self._backstop):
                await self._topology.ready()
                yield
        except (*_UNREACHABLE, TimeoutError) as exc:
            self.breaker.failed()
            raise BackendUnavailable() from exc
        except RedisError as exc:
            raise BackendUnavailable() from exc
        self.breaker.succeeded()

    async def ping(self) -> None:
        """A real round trip even while the breaker is open (the health probe asks the server)."""
        try:
            async with patient_timeout(self._budget, cap=self._backstop):
                await self._topology.ready()
                await self._topology.ping()
        except (*_UNREACHABLE, TimeoutError) as exc:
            self.breaker.failed()
            raise BackendUnavailable() from exc
        except RedisError as exc:
            raise BackendUnavailable() from exc
        self.breaker.succeeded()

    async def _probe(self) -> None:
        try:
            async with patient_timeout(self._budget, cap=self._backstop):
                await self._topology.ready()
                await self._topology.ping()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackendUnavailable() from exc

    async def close(self) -> None:
        await self.breaker.close()
        await self._topology.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get(self, key: str) -> bytes | None:
        async with self.guard():
            return _bytes(await self._client.get(self.key(key)))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []  # MGET with no key is a Redis error, and there is nothing to ask
        one_hash_tag(keys)
        async with self.guard():
            values = await self._client.mget([self.key(k) for k in keys])
        return [_bytes(value) for value in values]

    async def values(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self.guard(), self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(self.key(key))
            results = await pipe.execute()
        return [_bytes(value) for value in results]

    async def set(self, key: str, value: bytes, ttl: timedelta) -> None:
        async with self.guard():
            await self._client.set(self.key(key), value, px=_ms(ttl))

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: timedelta) -> None:
        for start in range(0, len(items), _BATCH):
            async with self.guard():
                await self._set_batch(items[start : start + _BATCH], _ms(ttl))

    async def _set_batch(self, items: Sequence[tuple[str, bytes]], millis: int) -> None:
        """One pipeline; behind Sentinel, confirmed to have reached the current master (a batch
        is the deny-list's entries or its rebuild: lost at a failover, they would let a revoked
        token through on replicas that already moved to the new master)."""
        await self._topology.ready()
        mark = self._topology.write_mark()
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(self.key(key), value, px=millis)
            await pipe.execute()
        await self._topology.confirm(mark)

    async def set_many_waiting(
        self, items: Sequence[tuple[str, bytes]], ttl: timedelta, *, within: timedelta
    ) -> bool:
        """Past the breaker, each try waits for Redis's answer (the socket time-out): on a stalled
        Redis the commands sent are queued there and run when it resumes; the next try, once it
        answers, stores the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within.total_seconds()
        millis, done = _ms(ttl), 0
        while True:
            try:
                while done < len(items):
                    remaining = max(0.05, deadline - loop.time())  # the last try ends by the deadline
                    async with patient_timeout(min(self._budget, remaining), cap=self._backstop):
                        await self._set_batch(items[done : done + _BATCH], millis)
                    done += _BATCH
                return True
            except TimeoutError:
                pass
            except _UNREACHABLE as exc:
                if _refused(exc):
                    return False  # nothing listens: Redis comes back empty or as another server
            except RedisError:
                return False
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_WAIT_PAUSE)

    async def set_if_absent(self, key: str, value: bytes, ttl: timedelta) -> bool:
        async with self.guard():
            return bool(await self._client.set(self.key(key), value, px=_ms(ttl), nx=True))

    async def get_and_delete(self, key: str) -> bytes | None:
        async with self.guard():
            return _bytes(await self._client.getdel(self.key(key)))

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: timedelta | None = None
    ) -> bool:
        args: list[Any] = [expected, value, 0 if ttl is None else _ms(ttl)]
        async with self.guard():
            return bool(await self._cas(keys=[self.key(key)], args=args))

    async def extend(self, key: str, expected: bytes, ttl: timedelta) -> bool:
        try:  # past the breaker: a breaker opened by slow answers must not end a lease
            async with patient_timeout(self._budget, cap=self._backstop):
                await self._topology.ready()
                return bool(await self._cas(keys=[self.key(key)], args=[expected, expected, _ms(ttl)]))
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackendUnavailable() from exc

    async def delete_if(self, key: str, expected: bytes) -> bool:
        async with self.guard():
            return bool(await self._delete_if(keys=[self.key(key)], args=[expected]))

    async def incr(self, key: str, amount: int, ttl: timedelta) -> int:
        async with self.guard():
            return int(await self._incr(keys=[self.key(key)], args=[amount, _ms(ttl)]))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        async with self.guard():
            return int(await self._client.delete(*[self.key(k) for k in keys]))

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        async with self.guard(), self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(self.key(key))
            results = await pipe.execute()
        return [bool(result) for result in results]

    async def ttl(self, key: str) -> timedelta | None:
        async with self.guard():
            millis = int(await self._client.pttl(self.key(key)))
        if millis == -2:
            return None
        if millis == -1:
            return timedelta.max  # no TTL: never written by this service
        return timedelta(milliseconds=millis)


# The rate-limit algorithm of storage/sliding_window.py, step for step, on one
# HASH per (group, key); 60000 is sliding_window.STRIKE_WINDOW_MS (no strike when only
# burst windows refused: shorter than a minute and than the longest window). Every
# write is followed by PEXPIRE, so no rl: key ever lives without a TTL. ARGV: now, cost,
# n windows, max strikes, block ms, block max ms, longest window ms, then points and
# length ms of each window.
_LIMIT_HIT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local max_strikes = tonumber(ARGV[4])
local block_ms = tonumber(ARGV[5])
local block_max = tonumber(ARGV[6])
local longest = tonumber(ARGV[7])
local st = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do st[raw[i]] = tonumber(raw[i + 1]) end
local function get(field, default)
  local value = st[field]
  if value == nil then return default end
  return value
end
local function keep()
  local ttl = 2 * longest
  if get('bu', 0) - now > ttl then ttl = get('bu', 0) - now end
  if get('se', 0) - now > ttl then ttl = get('se', 0) - now end
  if get('nb', 0) > 0 and get('ne', 0) - now > ttl then ttl = get('ne', 0) - now end
  if ttl < 1000 then ttl = 1000 end
  redis.call('PEXPIRE', key, math.ceil(ttl))
end
local buckets, currents, previous = {}, {}, {}
local wait, refused, striking = 0, false, false
for i = 0, n - 1 do
  local points = tonumber(ARGV[8 + 2 * i])
  local len = tonumber(ARGV[9 + 2 * i])
  local b = math.floor(now / len)
  local stored = get('b' .. i, -1)
  local c = get('c' .. i, 0)
  local p = get('p' .. i, 0)
  if stored == b then
  elseif stored == b - 1 then p = c; c = 0
  else p = 0; c = 0 end
  buckets[i], currents[i], previous[i] = b, c, p
  local start = b * len
  if p * (len - (now - start)) + (c + cost) * len > points * len then
    refused = true
    if len >= 60000 or len >= longest then striking = true end
    local room = points - cost
    local w
    if room < 0 then w = 2 * len
    elseif c > room then
      w = start + len - now - math.floor(-(len * (c - room)) / c)
    elseif p <= 0 then w = 0
    else
      w = start - math.floor(-(len * (p - room + c)) / p) - now
      if w < 0 then w = 0 end
    end
    if w > wait then wait = w end
  end
end
local blocked_until = get('bu', 0)
if blocked_until > now then
  if blocked_until - now > wait then wait = blocked_until - now end
  return {0, wait, 1, 0}
end
if not refused then
  local out = {1, 0, 0, 0}
  for i = 0, n - 1 do
    redis.call('HSET', key, 'b' .. i, buckets[i], 'c' .. i, currents[i] + cost, 'p' .. i, previous[i])
    out[#out + 1] = buckets[i]
  end
  keep()
  return out
end
if wait < 1 then wait = 1 end
if max_strikes <= 0 or not striking then return {0, wait, 0, 0} end
local strikes = 0
if get('se', 0) > now then strikes = get('s', 0) end
strikes = strikes + 1
if strikes < max_strikes then
  redis.call('HSET', key, 's', strikes, 'se', now + longest)
  st['s'] = strikes; st['se'] = now + longest
  keep()
  return {0, wait, 0, 0}
end
local earlier = 0
if get('ne', 0) > now then earlier = get('nb', 0) end
local length = block_ms * (2 ^ earlier)
if length > block_max then length = block_max end
redis.call('HSET', key, 'bu', now + length, 'nb', earlier + 1, 'ne', now + 86400000, 's', 0, 'se', 0)
st['bu'] = now + length; st['nb'] = earlier + 1; st['ne'] = now + 86400000; st['se'] = 0
keep()
if length > wait then wait = length end
return {0, wait, 1, length}
"""

# Refund: ARGV now, cost, then (window index, bucket) pairs. Never creates a key.
_LIMIT_REFUND = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local cost = tonumber(ARGV[2])
for j = 3, #ARGV, 2 do
  local i = ARGV[j]
  local taken = tonumber(ARGV[j + 1])
  local stored = tonumber(redis.call('HGET', key, 'b' .. i) or -1)
  local field = nil
  if stored == taken then field = 'c' .. i elseif stored == taken + 1 then field = 'p' .. i end
  if field then
    local value = tonumber(redis.call('HGET', key, field) or 0) - cost
    if value < 0 then value = 0 end
    redis.call('HSET', key, field, value)
  end
end
return 1
"""

# Reset (consecutive windows): ARGV window indexes. Never creates a key.
_LIMIT_RESET = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
for j = 1, #ARGV do redis.call('HSET', key, 'c' .. ARGV[j], 0, 'p' .. ARGV[j], 0) end
return 1
"""


# Leave one point: ARGV (window index, bucket, count) triples. Never creates a key; the TTL is
# kept (the key outlives its block and its windows already).
_LIMIT_LEAVE_ONE = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
for j = 1, #ARGV, 3 do
  redis.call('HSET', key, 'b' .. ARGV[j], ARGV[j + 1], 'c' .. ARGV[j], ARGV[j + 2], 'p' .. ARGV[j], 0)
end
return 1
"""


class RedisLimiterStore:
    """The :class:`~iam_grpc.storage.ports.LimiterStore` port on Redis: one script per check."""

    def __init__(self, redis: RedisEphemeral) -> None:
        self._redis = redis
        client = redis.client
        self._hit = client.register_script(_LIMIT_HIT)
        self._refund = client.register_script(_LIMIT_REFUND)
        self._reset = client.register_script(_LIMIT_RESET)
        self._leave_one = client.register_script(_LIMIT_LEAVE_ONE)

    async def hit(self, key: str, spec: LimitSpec, now_ms: int, cost: int = 1) -> HitResult:
        args: list[Any] = [
            now_ms,
            cost,
            len(spec.windows),
            spec.max_strikes,
            spec.block_ms,
            spec.block_max_ms,
            spec.longest_ms,
        ]
        for window in spec.windows:
            args += [window.points, window.length_ms]
        async with self._redis.guard():
            raw = await self._hit(keys=[self._redis.key(key)], args=args)
        values = [int(v) for v in raw]
        return HitResult(bool(values[0]), values[1], bool(values[2]), values[3], tuple(values[4:]))

    async def refund(
        self,
        key: str,
        spec: LimitSpec,
        now_ms: int,
        windows: tuple[int, ...],
        buckets: tuple[int, ...],
        cost: int = 1,
    ) -> None:
        if not windows:
            return
        args: list[Any] = [now_ms, cost]
        for i in windows:
            args += [i, buckets[i]]
        async with self._redis.guard():
            await self._refund(keys=[self._redis.key(key)], args=args)

    async def reset(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        if not windows:
            return
        async with self._redis.guard():
            await self._reset(keys=[self._redis.key(key)], args=list(windows))

    async def leave_one(self, key: str, spec: LimitSpec, now_ms: int, windows: tuple[int, ...]) -> None:
        args: list[Any] = []
        for i in windows:
            window = spec.windows[i]
            args += [i, now_ms // window.length_ms, max(0, window.points - 1)]
        if not args:
            return
        async with self._redis.guard():
            await self._leave_one(keys=[self._redis.key(key)], args=args)

    async def peek(self, key: str, spec: LimitSpec, now_ms: int) -> dict[str, Any]:
        async with self._redis.guard():
            raw = await self._redis.client.hgetall(self._redis.key(key))
        state = {k.decode() if isinstance(k, bytes) else str(k): float(v) for k, v in raw.items()}
        return sliding_window.peek(state, spec, now_ms)

    async def clear(self, key: str) -> bool:
        return await self._redis.delete(key) == 1

    async def ping(self) -> None:
        await self._redis.ping()
