"""Checks on requests: email domains, the Refresh anomaly checks, GeoIP and user agents, rate limits."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from iam_grpc.config.values import Duration, SettingsGroup, split_host_port
from iam_grpc.core.ratelimit.groups import DEFAULT_GROUPS, Group, parse_window


class EmailChecksSettings(SettingsGroup):
    check_mx: bool | None = None  # default: false embedded, true production
    mx_timeout: Duration = timedelta(seconds=1)
    nameservers: list[str] = []  # ip[:port]; empty: the system resolver
    disposable: bool = True
    allow_domains: list[str] = []
    deny_domains: list[str] = []

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        for item in value:
            split_host_port(item, default_port=53)
        return value


CheckAction = Literal["mfa", "block", "off"]


class CheckSettings(SettingsGroup):
    action: CheckAction = "mfa"


class AnomalySettings(SettingsGroup):
    """The Refresh checks of behaviour.md 3.2: one ``action`` per check, and their parameters."""

    device: CheckSettings = CheckSettings()
    idle: CheckSettings = CheckSettings()
    session_count: CheckSettings = CheckSettings()
    rotation_burst: CheckSettings = CheckSettings(action="block")
    network: CheckSettings = CheckSettings()
    risk: CheckSettings = CheckSettings()
    proxy: CheckSettings = CheckSettings()
    tor: CheckSettings = CheckSettings()
    fingerprint: CheckSettings = CheckSettings()
    travel: CheckSettings = CheckSettings()
    idle_after: Duration = timedelta(hours=72)
    max_sessions: int = Field(default=5, ge=1, le=1000)
    session_count_bypass: Duration = timedelta(days=7)
    burst_max: int = Field(default=3, ge=1, le=1000)
    burst_window: Duration = timedelta(minutes=10)
    ipv4_prefix: int = Field(default=24, ge=8, le=32)
    ipv6_prefix: int = Field(default=56, ge=16, le=128)
    asn_match: bool = True
    risk_threshold: int = Field(default=25, ge=1)
    proxy_allowance: Duration = timedelta(days=30)
    travel_max_kmh: float = Field(default=900, gt=0)
    travel_min_km: float = Field(default=500, ge=0)


class GeoipSettings(SettingsGroup):
    city_db: Path | None = None
    asn_db: Path | None = None
    anonymous_db: Path | None = None
    hosting_asns: list[int] = []


class UaSettings(SettingsGroup):
    cache_size: int = Field(default=10_000, ge=0)


class LimitGroupSettings(SettingsGroup):
    """Overrides of one limiter group's defaults (behaviour.md 8.3); unset fields keep them."""

    windows: list[str] | None = None  # e.g. ["10/1s", "100/10m"], "5/1h fc" for failures-only + consecutive
    max_strikes: int | None = Field(default=None, ge=0, le=100)
    block: Duration | None = None
    block_max: Duration | None = None

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("a group needs at least one window")
            for item in value:
                parse_window(item)
        return value


class RateLimitSettings(SettingsGroup):
    enabled: bool = True
    on_store_failure: Literal["local", "closed"] = "local"
    exempt_cidrs: list[str] = []
    groups: dict[str, LimitGroupSettings] = {}

    @field_validator("exempt_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError("entries must be CIDR networks such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _known_groups(self) -> Self:
        unknown = sorted(set(self.groups) - set(DEFAULT_GROUPS))
        if unknown:
            raise ValueError("ratelimit.groups: unknown group " + ", ".join(unknown))
        self.resolved_groups()  # validates block lengths of the merged groups
        return self

    def resolved_groups(self) -> dict[str, Group]:
        """The default groups with this configuration's overrides applied."""
        merged = dict(DEFAULT_GROUPS)
        for name, override in self.groups.items():
            merged[name] = merged[name].with_changes(
                windows=tuple(parse_window(w) for w in override.windows) if override.windows else None,
                max_strikes=override.max_strikes,
                block=override.block,
                block_max=override.block_max,
            )
        return merged

    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in self.exempt_cidrs]
