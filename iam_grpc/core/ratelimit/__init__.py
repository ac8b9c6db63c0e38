"""Layered rate limiting: groups, keys and the limiter (behaviour.md 8)."""

from iam_grpc.core.ratelimit.groups import DEFAULT_GROUPS, Group, Window, parse_window
from iam_grpc.core.ratelimit.keys import email_key, ip_key, pair_key, parse_ip
from iam_grpc.core.ratelimit.limiter import Permit, RateLimiter

__all__ = [
    "DEFAULT_GROUPS",
    "Group",
    "Permit",
    "RateLimiter",
    "Window",
    "email_key",
    "ip_key",
    "pair_key",
    "parse_ip",
    "parse_window",
]
