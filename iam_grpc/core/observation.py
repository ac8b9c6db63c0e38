"""What the service sees of a request's client (behaviour.md 6.1), and what it learns from it.

An :class:`Observation` is built once per request that needs it: the parsed user
agent and the geo data of the effective client IP. Learning (6.2, 6.4, 3.4)
updates a user-device link with the network, country and location of a
request that passed every check, or that proved itself by MFA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from iam_grpc.core.client import AgentParser, ClientInfo, ParsedAgent
from iam_grpc.core.devices import baseline_of
from iam_grpc.core.fingerprint import GeoInfo, learn_country, learn_network, raised_baseline
from iam_grpc.storage.records import UserDevice

__all__ = ["GeoSource", "LearningPolicy", "Observation", "Observer", "learned", "proven"]


class GeoSource(Protocol):
    def lookup(self, ip: str) -> GeoInfo: ...

    @property
    def has_anonymity_data(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Observation:
    agent: ParsedAgent
    geo: GeoInfo

    @property
    def location(self) -> str:
        return self.geo.location


class Observer:
    def __init__(self, agents: AgentParser, geo: GeoSource | None) -> None:
        self._agents = agents
        self._geo = geo

    @property
    def has_anonymity_data(self) -> bool:
        return self._geo is not None and self._geo.has_anonymity_data

    def observe(self, client: ClientInfo) -> Observation:
        geo = self._geo.lookup(client.ip) if self._geo is not None else GeoInfo()
        return Observation(self._agents.parse(client.user_agent), geo)


@dataclass(frozen=True, slots=True)
class LearningPolicy:
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    max_networks: int = 8
    network_memory: timedelta = timedelta(days=90)
    max_countries: int = 5
    proxy_allowance: timedelta = timedelta(days=30)


def learned(
    link: UserDevice,
    seen: Observation,
    ip: str,
    now: datetime,
    policy: LearningPolicy,
    *,
    allowed_ip: bool = False,
) -> UserDevice:
    """The link after a request that passed every check (6.2, 6.4): its network and country are
    known from now on, its location is the last located point (unless the ip is flagged and only
    allowed), browser and OS versions only ever rise in the baseline."""
    networks = learn_network(
        link.known_networks,
        ip,
        seen.geo,
        now,
        ipv4_prefix=policy.ipv4_prefix,
        ipv6_prefix=policy.ipv6_prefix,
        max_networks=policy.max_networks,
        memory=policy.network_memory,
    )
    updated = replace(
        link,
        known_networks=networks,
        known_countries=learn_country(
            link.known_countries,
            seen.geo.country,
            now,
            max_countries=policy.max_countries,
            memory=policy.network_memory,
        ),
        baseline=raised_baseline(link.baseline, seen.agent) if link.baseline else baseline_of(seen.agent),
        last_seen_at=now,
        last_ip=ip,
    )
    point = seen.geo.point
    if point is not None and not allowed_ip:
        updated = replace(
            updated, last_lat=point[0], last_lon=point[1], last_accuracy_km=point[2], last_located_at=now
        )
    return updated


def proven(
    link: UserDevice, seen: Observation, ip: str, now: datetime, policy: LearningPolicy, *, reason: str
) -> UserDevice:
    """The link after an MFA success (3.4): trusted now, baseline replaced by the current
    fingerprint, the current network, country and location learned, and for a proxy or hosting
    challenge an allowance for that class of address."""
    updated = learned(replace(link, baseline=baseline_of(seen.agent)), seen, ip, now, policy)
    updated = replace(updated, trusted_at=now)
    flagged = seen.geo.flagged_class
    if reason == "PROXY_OR_HOSTING" and flagged == "proxy":
        updated = replace(updated, proxy_allowed_until=now + policy.proxy_allowance)
    elif reason == "PROXY_OR_HOSTING" and flagged == "hosting":
        updated = replace(updated, hosting_allowed_until=now + policy.proxy_allowance)
    return updated
