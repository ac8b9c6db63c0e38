"""Risk score (behaviour.md 3.3): points for suspicious events, per ip and per
device, over the last 24 hours.

    await scores.add(ip=ip, device_id=device_id, ip_points=3, device_points=3)
    score = await scores.score(ip=ip, device_id=device_id)   # None: store down

Points go into hourly buckets in the ephemeral store, one counter per subject
and hour (``risk:ip:{<h>}:<hour>``, ``risk:dev:{<device_id>}:<hour>``). A
counter is created with ``incr``, so adding is atomic and needs no read, and
its TTL (one hour longer than the window) only collects garbage: which hours
count is decided by the key names, so the score decays hour by hour without
any job. All buckets of a subject share a hash tag, so one MGET reads them on
a Redis Cluster too.

The score is a signal, not a gate of its own: losing it must never break a
login. Adding points and resetting them swallow store failures (logged at
WARNING); reading a score answers None, and the caller skips its check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from types import MappingProxyType

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit.groups import Group
from iam_grpc.core.ratelimit.keys import ip_key
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Ephemeral

__all__ = ["POINTS", "RiskScores", "limiter_hook"]

log = component_logger("iam.risk")

POINTS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "failed_login": (3, 3),
        "wrong_code": (5, 5),
        "invalid_refresh": (2, 2),
        "limiter_refusal": (2, 0),
        "limiter_block": (10, 0),
        "token_reuse": (0, 25),
    }
)
"""Event -> (ip points, device points), the table of behaviour.md 3.3."""

_HOUR = 3600
_HASH_CHARS = 32  # of the 43-char keyed hash: 192 bits is plenty for a key, and keys stay short
_WARN_EVERY = 10.0  # seconds between repeated warnings while the store is down


class RiskScores:
    """Risk points of ips and devices in hourly buckets of the ephemeral store."""

    def __init__(
        self, ephemeral: Ephemeral, material: SecretMaterial, clock: Clock, *, window_hours: int = 24
    ) -> None:
        if window_hours < 1:
            raise ValueError("the risk window is at least one hour")
        self._ephemeral = ephemeral
        self._material = material
        self._clock = clock
        self._window = window_hours
        # One hour beyond the window: a bucket written at the very start of its hour still
        # exists for the whole of the last hour that counts it.
        self._ttl = timedelta(hours=window_hours + 1)
        self._last_warning: float | None = None
        self._suppressed = 0

    # keys -----------------------------------------------------------------------

    def _hour(self) -> int:
        return int(self._clock.now().timestamp()) // _HOUR

    def _ip_prefix(self, ip: str) -> str:
        # The rate limiter's ip key (IPv6 by /64), so a subscriber cannot dodge its score by
        # rotating addresses; hashed, so addresses are not readable in the store.
        digest = self._material.keyed_hash("ratelimit", ip_key(ip))[:_HASH_CHARS]
        return f"risk:ip:{{{digest}}}:"

    @staticmethod
    def _device_prefix(device_id: str) -> str:
        # device_id is an identifier, not a credential (behaviour.md 1.7), validated upstream
        return f"risk:dev:{{{device_id}}}:"

    def _window_keys(self, prefix: str) -> list[str]:
        now = self._hour()
        return [f"{prefix}{hour}" for hour in range(now - self._window + 1, now + 1)]

    # the API --------------------------------------------------------------------

    async def add(
        self,
        *,
        ip: str | None = None,
        device_id: str | None = None,
        ip_points: int = 0,
        device_points: int = 0,
    ) -> None:
        """Add points to the current hour of the ip and/or the device; never raises on store failure.

        Events are in :data:`POINTS`. Zero points or a missing subject write nothing.
        """
        if ip_points < 0 or device_points < 0:
            raise ValueError("risk points are never negative; reset_device clears a score")
        hour = self._hour()
        writes: list[Awaitable[None]] = []
        if ip and ip_points:
            writes.append(self._add_to(self._ip_prefix(ip) + str(hour), ip_points, ip=ip))
        if device_id and device_points:
            key = self._device_prefix(device_id) + str(hour)
            writes.append(self._add_to(key, device_points, device_h=self._material.log_hash(device_id)))
        await asyncio.gather(*writes)  # two subjects, two hash tags: in parallel rather than one call

    async def _add_to(self, key: str, points: int, **subject: str) -> None:
        try:
            await self._ephemeral.incr(key, points, self._ttl)
        except Exception as exc:
            self._warn("risk points not recorded", exc, subject)

    async def score(self, *, ip: str | None, device_id: str | None) -> int | None:
        """The larger of the ip's and the device's points over the window; 0 for no subject.

        None when the store failed: the caller skips the risk check and logs that it did
        (behaviour.md 3.3), so a store outage never locks users out.
        """
        reads: list[Awaitable[int]] = []
        if ip:
            reads.append(self._sum(self._ip_prefix(ip)))
        if device_id:
            reads.append(self._sum(self._device_prefix(device_id)))
        totals: list[int] = []
        for outcome in await asyncio.gather(*reads, return_exceptions=True):
            if isinstance(outcome, BackendUnavailable):
                return None
            if isinstance(outcome, BaseException):
                raise outcome  # not a store failure: a bug that should be seen
            totals.append(outcome)
        return max(totals, default=0)

    async def _sum(self, prefix: str) -> int:
        values = await self._ephemeral.get_many(self._window_keys(prefix))
        return sum(int(value) for value in values if value is not None)

    async def reset_device(self, device_id: str) -> None:
        """Forget the device's points (an MFA raised by the risk check succeeded); never raises.

        Every bucket the store may still hold goes, not only the counted ones, plus the next
        hour's, which a replica whose clock runs slightly ahead may already have written.
        """
        prefix = self._device_prefix(device_id)
        now = self._hour()
        keys = [f"{prefix}{hour}" for hour in range(now - self._window, now + 2)]
        try:
            await self._ephemeral.delete(*keys)
        except Exception as exc:
            self._warn("risk score not reset", exc, {"device_h": self._material.log_hash(device_id)})

    def _warn(self, message: str, exc: Exception, subject: Mapping[str, str]) -> None:
        # While the store is down every login would log; one line per interval says as much.
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < _WARN_EVERY:
            self._suppressed += 1
            return
        self._last_warning, suppressed, self._suppressed = now, self._suppressed, 0
        # the exception's type only: its text may carry a store key holding a device id
        log.bind(**subject, error=type(exc).__name__, suppressed=suppressed).warning(message)


def limiter_hook(scores: RiskScores) -> Callable[[Group, str, bool], Awaitable[None]]:
    """The ``on_refusal`` hook of :class:`~iam_grpc.core.ratelimit.RateLimiter` for the risk score.

    A refusal of an ip key adds ``limiter_refusal`` points to that ip; a refusal that
    imposed a block adds ``limiter_block`` points as well (the table lists the two events
    separately, and a blocking refusal is both).
    """
    refusal, block = POINTS["limiter_refusal"][0], POINTS["limiter_block"][0]

    async def on_refusal(group: Group, raw_key: str, new_block: bool) -> None:
        if group.key != "ip":  # the limiter only reports ip groups; this keeps the hook safe alone
            return
        await scores.add(ip=raw_key, ip_points=refusal + (block if new_block else 0))

    return on_refusal
