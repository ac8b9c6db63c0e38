"""User-Agent parsing (behaviour.md 6.1) with ua-parser and its Rust resolver.

The parser is built on first use, not at startup: its compiled matchers cost
about 30 MB, which an idle replica (or one serving only token checks) does not
need. Results are cached (``ua.cache_size``). A parse failure leaves every
field empty; it never fails a request.
"""

from __future__ import annotations

import threading
from typing import Any

from iam_grpc.core.client import ParsedAgent

__all__ = ["ParsedAgent", "UserAgentParser"]

_GENERIC = {"Other", "Generic", "Generic Smartphone", "Generic Feature Phone", "Generic Tablet", ""}


def _clean(value: str | None) -> str | None:
    return None if value is None or value in _GENERIC else value[:64]


def _version(value: str | None) -> str | None:
    """A version part as the parser read it from the User-Agent (any number of digits), cut to the
    16 characters that are stored (devices.browser_major, os_major)."""
    return value[:16] if value else None


def _device_type(family: str | None, os_family: str | None, device_family: str | None, raw: str) -> str:
    lowered = raw.lower()
    if family == "Spider" or device_family == "Spider" or ("bot" in lowered and "http" in lowered):
        return "bot"
    if "ipad" in lowered or "tablet" in lowered or (os_family == "Android" and "mobile" not in lowered):
        return "tablet"
    if os_family in ("iOS", "Android", "Windows Phone", "BlackBerry OS") or "mobile" in lowered:
        return "mobile"
    if os_family in ("Windows", "Mac OS X", "Linux", "Ubuntu", "Fedora", "Chrome OS", "FreeBSD", "Debian"):
        return "desktop"
    return "other"


class UserAgentParser:
    def __init__(self, cache_size: int = 10_000) -> None:
        self._cache_size = max(cache_size, 1)
        self._parser: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._parser is None:
                from ua_parser import BestAvailableResolver, CachingResolver, Parser, load_builtins
                from ua_parser.caching import Lru

                self._parser = Parser(
                    CachingResolver(BestAvailableResolver(load_builtins()), Lru(self._cache_size))
                )
        return self._parser

    def parse(self, user_agent: str) -> ParsedAgent:
        if not user_agent:
            return ParsedAgent()
        try:
            result = (self._parser or self._load()).parse(user_agent[:1024])
        except Exception:
            return ParsedAgent()
        agent, system, device = result.user_agent, result.os, result.device
        family = agent.family if agent else None
        os_family = system.family if system else None
        device_family = device.family if device else None
        return ParsedAgent(
            browser_family=_clean(family),
            browser_major=_version(agent.major) if agent else None,
            browser_minor=_version(agent.minor) if agent else None,
            os_family=_clean(os_family),
            os_major=_version(system.major) if system else None,
            device_family=_clean(device_family),
            device_brand=_clean(device.brand) if device else None,
            device_model=_clean(device.model) if device else None,
            device_type=_device_type(family, os_family, device_family, user_agent),
        )
