"""Value types shared by the settings groups: durations, masked URLs, ``host:port`` text."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(value: Any) -> Any:
    """Accept seconds (int/float) or text like ``250ms``, ``15m``, ``30d``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30, '15m' or '30d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("must be a duration such as 30, '250ms', '15m' or '30d'")
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    return value


def _format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(_parse_duration),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
]


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and ``config show``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _masked(value: str) -> str:
    return mask_url(value)


MaskedUrl = Annotated[str, PlainSerializer(_masked, return_type=str, when_used="json")]


class SettingsGroup(BaseModel):
    """A group of settings (``[tokens]``, ``IAM_TOKENS__*``): frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with ``default_port``) a bare host; ValueError names the rule."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError("must be host:port")
        port_text = str(default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number between 0 and 65535")
    if not host:
        raise ValueError("host is missing")
    if ":" in host:
        ipaddress.IPv6Address(host)  # raises ValueError with a message that holds no secret
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
