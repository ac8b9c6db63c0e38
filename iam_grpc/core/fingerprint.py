"""Fingerprint rules (behaviour.md 6.2 to 6.5): what a device looked like, and whether it still does.

Everything here is a pure function of recorded state, the parsed user agent and
the geo facts of the ip, so the anomaly checks and the MFA bookkeeping can be
tested without a database, a GeoIP file or a clock:

- ``fingerprint_mismatches`` is check 9 (6.3): a short list of coarse fields
  that tolerate what normal use changes (browser and OS updates, city-level geo
  noise, ua-parser's "Generic" device guesses) and flag what a stolen token in
  another browser or country changes.
- ``network_known`` and ``learn_network`` are check 6 and its memory (6.4):
  a prefix rather than an exact address, because mobile and CGNAT users change
  addresses within their provider's block all day, and optionally the provider
  itself (ASN plus country) for providers that hand out addresses from many
  blocks.
- ``travel_is_impossible`` is check 10 (6.5): great-circle speed with the
  databases' own accuracy radii subtracted, so that two fuzzy city-level
  guesses cannot add up to a flight.

``GeoInfo`` lives here, not in the GeoIP adapter (``iam_grpc.geo``, which
re-exports it), so that core code can take geo facts without importing an
adapter.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from iam_grpc.core.client import ParsedAgent
from iam_grpc.core.devices import coarse_value
from iam_grpc.core.ratelimit.keys import parse_ip

__all__ = [
    "EARTH_RADIUS_KM",
    "UNKNOWN_ACCURACY_KM",
    "GeoInfo",
    "distance_km",
    "fingerprint_mismatches",
    "learn_country",
    "learn_network",
    "network_key",
    "network_known",
    "raised_baseline",
    "recent_countries",
    "travel_is_impossible",
]

EARTH_RADIUS_KM = 6371.0
# What an ip without an accuracy radius is assumed to be off by (6.5): a city-level guess.
UNKNOWN_ACCURACY_KM = 50
# Below this, elapsed time is rounded up (6.5): clocks of two replicas and the
# database's own timestamps are not precise enough to divide by seconds.
_MIN_TRAVEL_HOURS = 0.25


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """What the GeoIP databases say about one ip; every field empty when nothing is known.

    Empty is the normal answer (no database configured, an address not in it,
    a private address), and every consumer treats an empty field as "no
    evidence", never as a mismatch.
    """

    country: str | None = None  # ISO 3166-1 alpha-2
    region: str | None = None  # most specific subdivision ISO code
    city: str | None = None  # English name
    latitude: float | None = None
    longitude: float | None = None
    accuracy_km: int | None = None
    time_zone: str | None = None
    asn: int | None = None
    as_org: str | None = None
    vpn: bool = False
    public_proxy: bool = False
    residential_proxy: bool = False
    tor_exit: bool = False
    hosting: bool = False  # the anonymous-IP database's flag, or the ASN is in geoip.hosting_asns

    @property
    def anonymising(self) -> bool:
        """Traffic relayed to hide its origin. The databases' own aggregate ``is_anonymous`` is
        not used: it is also set for plain hosting, which check 8 allows as a separate class."""
        return self.vpn or self.public_proxy or self.residential_proxy or self.tor_exit

    @property
    def flagged_class(self) -> str | None:
        """The allowance class of check 8: ``proxy`` outranks ``hosting`` (a VPN in a data centre
        is a proxy), ``None`` when the ip is not flagged."""
        if self.anonymising:
            return "proxy"
        if self.hosting:
            return "hosting"
        return None

    @property
    def location(self) -> str:
        """``Berlin, BE, DE`` from whatever is known, ``""`` when nothing is: for emails and
        session lists, where a partial place is still better than none."""
        return ", ".join(part for part in (self.city, self.region, self.country) if part)

    @property
    def point(self) -> tuple[float, float, int | None] | None:
        """``(latitude, longitude, accuracy_km)`` for check 10, or ``None`` without coordinates."""
        if self.latitude is None or self.longitude is None:
            return None
        return (self.latitude, self.longitude, self.accuracy_km)


# ---------------------------------------------------------------------------
# networks (6.4)


def network_key(ip: str, *, ipv4_prefix: int = 24, ipv6_prefix: int = 56) -> str | None:
    """The ip's network as ``"203.0.113.0/24"`` or ``"2001:db8:0:100::/56"``; ``None`` when the ip
    does not parse. IPv4-mapped IPv6 counts as the IPv4 address it carries, so a dual-stack
    listener does not make a known network look new."""
    address = parse_ip(ip)
    if address is None:
        return None
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((address, prefix), strict=False))


def network_known(
    known_networks: Sequence[Mapping[str, Any]],
    ip: str,
    geo: GeoInfo,
    *,
    ipv4_prefix: int = 24,
    ipv6_prefix: int = 56,
    asn_match: bool = True,
) -> bool:
    """Check 6 passes: a known entry has the ip's prefix, or (with ``asn_match``) the ip's ASN and
    country together. The country is required with the ASN because large providers span
    continents under one ASN. A user-device with no networks yet passes: its first network is
    learned, not challenged (6.4)."""
    if not known_networks:
        return True
    key = network_key(ip, ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix)
    if key is not None and any(entry.get("prefix") == key for entry in known_networks):
        return True
    if not asn_match or geo.asn is None or not geo.country:
        return False
    country = geo.country.upper()
    return any(
        entry.get("asn") == geo.asn and str(entry.get("country") or "").upper() == country
        for entry in known_networks
    )


def learn_network(
    known_networks: Sequence[Mapping[str, Any]],
    ip: str,
    geo: GeoInfo,
    now: datetime,
    *,
    ipv4_prefix: int = 24,
    ipv6_prefix: int = 56,
    max_networks: int = 8,
    memory: timedelta = timedelta(days=90),
) -> list[dict[str, Any]]:
    """The list after the ip's network was seen at ``now``: its entry added or refreshed (with the
    ip's current ASN and country when known), entries unseen for longer than ``memory`` dropped,
    and only the ``max_networks`` most recently seen kept, oldest first.

    Entries are stored as JSON, so ``seen_at`` is an ISO 8601 string; an entry whose time does
    not parse is dropped rather than kept forever. The input is not modified."""
    now = _utc(now)
    horizon = now - memory
    kept: list[tuple[datetime, dict[str, Any]]] = []
    key = network_key(ip, ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix)
    for entry in known_networks:
        if key is not None and entry.get("prefix") == key:
            continue  # replaced by the refreshed entry below
        seen_at = _parse_time(entry.get("seen_at"))
        if seen_at is None or seen_at < horizon:
            continue
        kept.append((seen_at, dict(entry)))
    if key is not None:
        previous = next((entry for entry in known_networks if entry.get("prefix") == key), {})
        kept.append(
            (
                now,
                {
                    "prefix": key,
                    "asn": geo.asn if geo.asn is not None else previous.get("asn"),
                    "country": geo.country or previous.get("country"),
                    "seen_at": now.isoformat(),
                },
            )
        )
    kept.sort(key=lambda item: item[0])  # stable: ties keep their stored order
    if max_networks <= 0:
        return []
    return [entry for _, entry in kept[-max_networks:]]


def _country_entries(known_countries: Sequence[Any], now: datetime) -> list[tuple[datetime, str]]:
    """(seen_at, code) for each stored entry, codes upper-case. Entries are ``{code, seen_at}``
    objects; a bare code (the format before countries were timed) counts as seen ``now``, so it
    starts its 90 days from its first use after the upgrade. Anything else is dropped."""
    entries: list[tuple[datetime, str]] = []
    for item in known_countries:
        seen_at: datetime | None
        if isinstance(item, str):
            code, seen_at = item, _utc(now)
        elif isinstance(item, Mapping):
            code, seen_at = str(item.get("code") or ""), _parse_time(item.get("seen_at"))
        else:
            continue
        if code and seen_at is not None:
            entries.append((seen_at, code.upper()))
    return entries


def recent_countries(
    known_countries: Sequence[Any], now: datetime, *, memory: timedelta = timedelta(days=90)
) -> list[str]:
    """The codes seen within ``memory`` of ``now`` (6.2): a country not seen for 90 days is
    unknown again, even on a device that has not been written since."""
    horizon = _utc(now) - memory
    return [code for seen_at, code in _country_entries(known_countries, now) if seen_at >= horizon]


def learn_country(
    known_countries: Sequence[Any],
    country: str | None,
    now: datetime,
    *,
    max_countries: int = 5,
    memory: timedelta = timedelta(days=90),
) -> list[dict[str, str]]:
    """The list after ``country`` was seen at ``now``: its entry moved or added to the end (most
    recent last), entries unseen for longer than ``memory`` dropped, only the last
    ``max_countries`` kept. Codes are kept upper-case so a database that spells them differently
    does not learn the same country twice. The input is not modified."""
    now = _utc(now)
    horizon = now - memory
    code = country.upper() if country else None
    kept = [(seen_at, known) for seen_at, known in _country_entries(known_countries, now) if known != code]
    kept = [(seen_at, known) for seen_at, known in kept if seen_at >= horizon]
    if code:
        kept.append((now, code))
    kept.sort(key=lambda item: item[0])  # stable: ties keep their stored order
    if max_countries <= 0:
        return []
    return [{"code": known, "seen_at": seen_at.isoformat()} for seen_at, known in kept[-max_countries:]]


# ---------------------------------------------------------------------------
# comparison (6.3) and baseline upkeep (6.2)

# (family field, major field): a version is only comparable within one product.
_VERSIONED = (("browser_family", "browser_major"), ("os_family", "os_major"))


def fingerprint_mismatches(
    baseline: Mapping[str, Any],
    agent: ParsedAgent,
    geo: GeoInfo,
    known_countries: Sequence[str],
    *,
    skip_country: bool = False,
) -> list[str]:
    """The names of the 6.3 fields that differ beyond tolerance; empty means check 9 passes.

    The coarse fields (browser family, OS family, device type) follow
    :func:`~iam_grpc.core.devices.matches_baseline`: one recorded in the baseline must be present
    in the request, so an empty or stripped User-Agent is never a wildcard. The finer fields
    (versions, brand, model, country) are skipped when empty on either side: an ip without geo
    data, or a version ua-parser cannot read, is no evidence of another device. When the
    families differ, only the family is reported; the two products' version numbers say nothing
    about each other.
    The country is skipped with ``skip_country`` (the ip is flagged and allowed, check 8) and
    when no country has been learned yet.
    """
    failed: list[str] = []
    for family_field, major_field in _VERSIONED:
        if _coarse_differs(baseline.get(family_field), getattr(agent, family_field)):
            failed.append(family_field)
            continue
        recorded_major, current_major = _text(baseline.get(major_field)), _text(getattr(agent, major_field))
        if recorded_major and current_major and not _not_older(current_major, recorded_major):
            failed.append(major_field)
    if _coarse_differs(baseline.get("device_type"), agent.device_type):
        failed.append("device_type")
    for name in ("device_brand", "device_model"):
        recorded, current = _text(baseline.get(name)), _text(getattr(agent, name))
        if recorded is None or current is None or _generic(recorded) or _generic(current):
            continue
        if recorded.casefold() != current.casefold():
            failed.append(name)
    known = {code.upper() for code in known_countries if code}
    if not skip_country and known and geo.country and geo.country.upper() not in known:
        failed.append("country")
    return failed


def raised_baseline(baseline: Mapping[str, Any], agent: ParsedAgent) -> dict[str, Any]:
    """The baseline with the browser and OS major versions raised to the current ones when those
    are newer within the same family (6.2), so that an update is compared against the version the
    user now runs and a later downgrade back to the old one is noticed."""
    raised = dict(baseline)
    for family_field, major_field in _VERSIONED:
        if not _same(baseline.get(family_field), getattr(agent, family_field)):
            continue
        recorded, current = _int(baseline.get(major_field)), _int(getattr(agent, major_field))
        if recorded is not None and current is not None and current > recorded:
            raised[major_field] = getattr(agent, major_field)
    return raised


def _coarse_differs(recorded: Any, current: Any) -> bool:
    """A coarse field recorded in the baseline and missing from, or different in, the request."""
    expected = coarse_value(recorded)
    return bool(expected) and coarse_value(current) != expected


def _text(value: Any) -> str | None:
    """A stored or parsed field as stripped text; ``None`` for empty (JSON may hold numbers)."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _same(recorded: Any, current: Any) -> bool | None:
    """Case-insensitive equality of two fields; ``None`` when either is empty (not comparable)."""
    left, right = _text(recorded), _text(current)
    if left is None or right is None:
        return None
    return left.casefold() == right.casefold()


def _int(value: Any) -> int | None:
    text = _text(value)
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _not_older(current: str, recorded: str) -> bool:
    """Upgrades pass, downgrades do not; versions that are not plain numbers must be equal."""
    current_number, recorded_number = _int(current), _int(recorded)
    if current_number is not None and recorded_number is not None:
        return current_number >= recorded_number
    return current.casefold() == recorded.casefold()


def _generic(value: str) -> bool:
    """One of ua-parser's placeholders (``Other``, ``Generic``, ``Generic Smartphone``, ...),
    which it returns when it does not know the hardware: no evidence either way."""
    lowered = value.casefold()
    return lowered in ("other", "generic") or lowered.startswith("generic ")


# ---------------------------------------------------------------------------
# impossible travel (6.5)


def distance_km(a_lat: float, a_lon: float, b_lat: float, b_lon: float) -> float:
    """Great-circle distance by the haversine formula on a sphere of radius 6371 km (the 0.5 %
    error against the ellipsoid is far below the databases' own accuracy)."""
    phi_a, phi_b = math.radians(a_lat), math.radians(b_lat)
    d_phi = phi_b - phi_a
    d_lambda = math.radians(b_lon - a_lon)
    h = math.sin(d_phi / 2) ** 2 + math.cos(phi_a) * math.cos(phi_b) * math.sin(d_lambda / 2) ** 2
    # Rounding can push h a hair outside [0, 1] for antipodal or identical points.
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, max(0.0, h))))


def travel_is_impossible(
    previous: tuple[float, float, int | None],
    previous_at: datetime,
    current: tuple[float, float, int | None],
    now: datetime,
    *,
    min_km: float = 500,
    max_kmh: float = 900,
) -> bool:
    """Check 10 hits: the distance beyond both points' uncertainty is at least ``min_km`` and
    covering it since ``previous_at`` needs more than ``max_kmh``.

    Each point's accuracy radius (50 km when unknown) is subtracted because the databases place
    an ip somewhere in a circle, not at its centre. Elapsed time counts at least a quarter of an
    hour (and a clock that went backwards counts as that), so nearby hops seconds apart are
    judged by distance, not by a division by almost zero.
    """
    prev_lat, prev_lon, prev_accuracy = previous
    cur_lat, cur_lon, cur_accuracy = current
    distance = distance_km(prev_lat, prev_lon, cur_lat, cur_lon)
    effective = max(0.0, distance - _accuracy(prev_accuracy) - _accuracy(cur_accuracy))
    if effective < min_km:
        return False
    hours = max(_MIN_TRAVEL_HOURS, (_utc(now) - _utc(previous_at)).total_seconds() / 3600)
    return effective / hours > max_kmh


def _accuracy(radius: int | None) -> float:
    return float(UNKNOWN_ACCURACY_KM if radius is None else max(radius, 0))


def _utc(moment: datetime) -> datetime:
    """Naive times are taken as UTC, so a value from a store that drops the zone still compares."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _utc(value)
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None
