"""Rate-limit state of one key (behaviour.md 8.6): shared Redis state only; without Redis the
limits live in each serving process's memory."""

from __future__ import annotations

from iam_grpc.admin.context import AdminTools
from iam_grpc.admin.errors import Invalid, Unavailable
from iam_grpc.core.ratelimit import email_key, ip_key, pair_key

__all__ = ["clear_limits", "show_limits"]


def _raw_key(tools: AdminTools, group: str, key: str) -> str:
    """The key as the limiter counts it: ``key`` is an IP, an email, ``IP EMAIL`` for pair groups,
    a user id, ..."""
    if not tools.stores.shared:
        raise Unavailable(
            "without redis.url the limits live in the serving process's memory; "
            "they cannot be read from here (a restart clears them)"
        )
    try:
        kind = tools.limiter.group(group).key
    except KeyError:
        raise Invalid(f"no limiter group {group}") from None
    if kind == "ip":
        return str(ip_key(key))
    if kind == "email":
        return str(email_key(key))
    if kind == "ip_email":
        ip, _, email = key.strip().partition(" ")
        return str(pair_key(ip, email.strip()))
    return key.strip()


async def show_limits(tools: AdminTools, group: str, key: str) -> dict[str, object]:
    """The key's window estimates, strikes and block."""
    return dict(await tools.limiter.peek(group, _raw_key(tools, group, key)))


async def clear_limits(tools: AdminTools, group: str, key: str) -> bool:
    """Remove the key's counts, strikes and block (audited as ``ratelimit.unblocked``); False when
    there was nothing to clear."""
    limiter, audit = tools.limiter, tools.audit
    raw = _raw_key(tools, group, key)
    cleared = await limiter.clear(group, raw)
    key_h = limiter.store_key(limiter.group(group), raw).rsplit(":", 1)[1][:12]
    details = {"group": group, "key_h": key_h, "existed": cleared}
    await audit.record(audit.event("ratelimit.unblocked", "info", details=details))
    return cleared
