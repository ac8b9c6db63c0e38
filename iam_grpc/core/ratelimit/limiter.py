"""Rate limiting (behaviour.md 8): groups of sliding windows, strikes,
bounded escalating blocks, failure reservations and consecutive resets.

    permit = await limiter.hit("login.pair", pair_key(ip, email))   # raises RateLimited
    ...verify the password...
    await permit.succeeded()      # refunds failure windows, resets consecutive ones

State lives behind the :class:`~iam_grpc.storage.ports.LimiterStore` port:
Redis (one Lua script per check) or the in-process store. When Redis fails,
``ratelimit.on_store_failure = "local"`` applies the same groups in process
memory (per replica) and says so at WARNING; ``"closed"`` answers
UNAVAILABLE.

Refusals of ip-keyed groups can be reported to an ``on_refusal`` hook (the
risk score counts them, behaviour.md 3.3). The hook is advisory: whatever it
does, the caller still gets RATE_LIMITED.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.ratelimit.groups import Group
from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.errors import BackendUnavailable, RateLimited
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import LimiterStore
from iam_grpc.storage.records import HitResult

__all__ = ["Permit", "RateLimiter", "RefusalHook"]

log = component_logger("iam.ratelimit")

_WARN_EVERY = 10.0  # seconds between repeated "store failed, limiting locally" warnings

RefusalHook = Callable[[Group, str, bool], Awaitable[None]]
"""``(group, raw key, whether this refusal imposed a new block)``, awaited before RATE_LIMITED is raised."""


@dataclass
class Permit:
    """One consumed request; tell it the outcome when the group counts failures."""

    limiter: RateLimiter | None
    group: Group
    key: str
    buckets: tuple[int, ...]
    store: LimiterStore | None

    async def succeeded(self) -> None:
        """Give back failure reservations and reset consecutive-failure windows."""
        if self.limiter is None or self.store is None or not self.buckets:
            return
        await self.limiter.settle(self, success=True)

    async def failed(self) -> None:
        """Keep the reservation (nothing to do; present for symmetry and readability)."""
        return

    async def refund(self) -> None:
        """Give back a failure reservation without counting a success: the guarded attempt never
        happened (refused by another group, or not run because of our own load). Consecutive
        windows keep their count."""
        if self.limiter is None or self.store is None or not self.buckets:
            return
        await self.limiter.settle(self, success=False, refund=True)


class RateLimiter:
    def __init__(
        self,
        store: LimiterStore,
        *,
        groups: Mapping[str, Group],
        material: SecretMaterial,
        clock: Clock,
        metrics: CoreMetrics,
        fallback: LimiterStore | None = None,
        exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        audit: AuditTrail | None = None,
        enabled: bool = True,
        on_refusal: RefusalHook | None = None,
    ) -> None:
        self._store = store
        self._fallback = fallback
        self._groups = dict(groups)
        self._material = material
        self._clock = clock
        self._metrics = metrics
        self._exempt = tuple(exempt)
        self._audit = audit
        self._enabled = enabled
        self._on_refusal = on_refusal
        self._last_warning = 0.0

    @property
    def groups(self) -> Mapping[str, Group]:
        return self._groups

    def group(self, name: str) -> Group:
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"no limiter group {name!r}") from None

    def store_key(self, group: Group, raw_key: str) -> str:
        """``rl:{<group>:<keyed hash>}``: one Redis Cluster slot per (group, key)."""
        digest = self._material.keyed_hash("ratelimit", f"{group.name}\x00{raw_key}")
        return f"rl:{{{group.name}:{digest}}}"

    def _exempt_ip(self, group: Group, raw_key: str) -> bool:
        if group.key != "ip" or not self._exempt:
            return False
        address = parse_ip(raw_key.split("/", 1)[0])
        return address is not None and any(address in network for network in self._exempt)

    def _now_ms(self) -> int:
        return int(self._clock.now().timestamp() * 1000)

    async def _call(self, operation: str, group: Group, *args: Any) -> tuple[Any, LimiterStore]:
        try:
            return await getattr(self._store, operation)(*args), self._store
        except BackendUnavailable:
            if self._fallback is None:
                raise
            self._metrics.ratelimit_fallbacks.inc()
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY:
                self._last_warning = now
                log.bind(group=group.name).warning("limiter store failed; limiting in process memory")
            return await getattr(self._fallback, operation)(*args), self._fallback

    async def hit(self, name: str, raw_key: str, cost: int = 1) -> Permit:
        """Consume one request of ``raw_key`` in group ``name`` or raise RateLimited."""
        group = self.group(name)
        if not self._enabled or self._exempt_ip(group, raw_key):
            return Permit(None, group, "", (), None)
        key = self.store_key(group, raw_key)
        result, store = await self._call("hit", group, key, group.spec, self._now_ms(), cost)
        if not result.allowed:
            await self._refused(group, key, raw_key, result)
        return Permit(self, group, key, result.buckets, store)

    async def ensure_not_blocked(self, name: str, raw_key: str) -> None:
        """Refuse when a block of this group is in force for the key (nothing consumed)."""
        group = self.group(name)
        if not self._enabled or self._exempt_ip(group, raw_key):
            return
        key = self.store_key(group, raw_key)
        state, _ = await self._call("peek", group, key, group.spec, self._now_ms())
        if state["blocked_ms"] > 0:
            self._metrics.ratelimit_refusals.labels(group.name).inc()
            await self._report_refusal(group, raw_key, new_block=False)
            raise RateLimited(timedelta(milliseconds=state["blocked_ms"]), group.key)

    async def settle(self, permit: Permit, *, success: bool, refund: bool = False) -> None:
        """A success gives back the failure reservation and resets consecutive windows; ``refund``
        only gives back the reservation."""
        if not (success or refund) or permit.store is None:
            return
        group = permit.group
        now = self._now_ms()
        try:
            await permit.store.refund(permit.key, group.spec, now, group.failure_windows, permit.buckets)
            if success:
                await permit.store.reset(permit.key, group.spec, now, group.consecutive_windows)
        except BackendUnavailable:
            # The call succeeded: it must not fail now. The reservation stays counted (stricter,
            # never looser) until its window moves on.
            self._metrics.ratelimit_fallbacks.inc()
            log.bind(group=group.name).warning("limiter store failed; refund skipped")

    async def leave_one(self, name: str, raw_key: str) -> None:
        """Set every window of the group one point short of full for the key, keeping its strikes
        and any block: a guard then ends with its block (one request passes afterwards) instead of
        outliving it on a full window, and the next refusal blocks again, doubled."""
        group = self.group(name)
        if not self._enabled or self._exempt_ip(group, raw_key):
            return
        windows = tuple(range(len(group.windows)))
        key = self.store_key(group, raw_key)
        await self._call("leave_one", group, key, group.spec, self._now_ms(), windows)

    async def peek(self, name: str, raw_key: str) -> dict[str, Any]:
        group = self.group(name)
        key = self.store_key(group, raw_key)
        state, _ = await self._call("peek", group, key, group.spec, self._now_ms())
        return {
            "group": group.name,
            "key_kind": group.key,
            "windows": [str(w) for w in group.windows],
            **state,
        }

    async def clear(self, name: str, raw_key: str) -> bool:
        group = self.group(name)
        cleared, _ = await self._call("clear", group, self.store_key(group, raw_key))
        return bool(cleared)

    async def _report_refusal(self, group: Group, raw_key: str, *, new_block: bool) -> None:
        """Tell the hook about a refusal of an ip key; its failure must not replace RATE_LIMITED."""
        if self._on_refusal is None or group.key != "ip":
            return
        try:
            await self._on_refusal(group, raw_key, new_block)
        except Exception as exc:
            # the type only: the hook's exception text is not ours to vet for secrets
            log.bind(group=group.name, error=type(exc).__name__).warning("refusal hook failed")

    async def _refused(self, group: Group, key: str, raw_key: str, result: HitResult) -> None:
        self._metrics.ratelimit_refusals.labels(group.name).inc()
        if result.new_block_ms > 0:
            self._metrics.ratelimit_blocks.labels(group.name).inc()
            key_h = key.rsplit(":", 1)[1][:12]
            log.bind(group=group.name, key_h=key_h, block_s=result.new_block_ms / 1000).warning(
                "rate-limit block imposed"
            )
            if self._audit is not None:
                # in the background: the caller may be inside a transaction (SQLite has one writer)
                details = {"group": group.name, "key_h": key_h, "seconds": result.new_block_ms // 1000}
                self._audit.record_soon(self._audit.event("ratelimit.blocked", "info", details=details))
        await self._report_refusal(group, raw_key, new_block=result.new_block_ms > 0)
        raise RateLimited(timedelta(milliseconds=result.retry_ms), group.key)
