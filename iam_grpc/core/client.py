"""What the service knows of the end user's client: the request as the calling service described
it (:class:`ClientInfo`) and its parsed User-Agent (:class:`ParsedAgent`).

``ParsedAgent`` lives here, not in the ua-parser adapter (``iam_grpc.ua``, which implements
:class:`AgentParser` and re-exports it), so that core code can take what a User-Agent says
without importing a parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["AgentParser", "ClientInfo", "ParsedAgent"]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The end user's request as the calling service described it (``ClientContext``)."""

    ip: str
    user_agent: str = ""
    device_id: str = ""
    accept_language: str = ""


@dataclass(frozen=True, slots=True)
class ParsedAgent:
    browser_family: str | None = None
    browser_major: str | None = None
    browser_minor: str | None = None
    os_family: str | None = None
    os_major: str | None = None
    device_family: str | None = None
    device_brand: str | None = None
    device_model: str | None = None
    device_type: str | None = None  # bot, mobile, tablet, desktop, other

    @property
    def label(self) -> str:
        """``Firefox on Ubuntu (desktop)``: what a user recognises in a session list."""
        browser = self.browser_family or "Unknown browser"
        system = self.os_family or "unknown system"
        kind = f" ({self.device_type})" if self.device_type else ""
        return f"{browser} on {system}{kind}"


class AgentParser(Protocol):
    """Reads a User-Agent header (behaviour.md 6.1); a failure is an empty :class:`ParsedAgent`,
    never an error."""

    def parse(self, user_agent: str) -> ParsedAgent: ...
