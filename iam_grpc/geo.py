"""GeoIP lookups (behaviour.md 6.1): MaxMind City, ASN and Anonymous IP databases via geoip2.

Every database is optional and every failure is quiet: a database that is not
configured, an address it does not hold, an ip that does not parse or a record
that does not decode all leave the affected fields empty. Geo data only ever
adds evidence to the anomaly checks; its absence must never fail a request
(the reference turned a lookup error into an unhandled 500).

Configuration errors are the exception: a configured path that is missing, is
not a MaxMind database, or holds another kind of database than its setting
says stops startup with a ``ValueError`` naming the setting, because running
without the data an operator asked for would silently disable checks 8 and 10.

Readers memory-map the files through maxminddb's C extension when it is built
(``MODE_AUTO``), so a lookup does no file I/O on the event loop and readers are
safe to share between threads. Answers are cached per ip string: the files are
read-only for the life of the process, so a cached answer cannot go stale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Self, TypeVar

import geoip2.database
import geoip2.errors
import maxminddb

from iam_grpc.config import GeoipSettings
from iam_grpc.core.fingerprint import GeoInfo
from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.logging import component_logger

__all__ = ["GeoInfo", "GeoLookup", "geo_lookup"]

log = component_logger("iam.geo")

_EMPTY = GeoInfo()
_T = TypeVar("_T")

# The substring each geoip2 reader method requires of the database type (geoip2 checks
# ``expected in metadata.database_type``): City also matches GeoLite2-City and GeoIP2-City.
_CITY_TYPE = "City"
_ASN_TYPE = "GeoLite2-ASN"
_ANONYMOUS_TYPE = "GeoIP2-Anonymous-IP"


class GeoLookup:
    """The three optional readers behind one quiet ``lookup``.

    ``hosting_asns`` marks whole providers as hosting where no anonymous-IP database is bought
    (or it misses a provider). ``cache_size`` bounds the per-ip answer cache; 0 disables it.
    """

    def __init__(
        self,
        *,
        city_db: Path | None = None,
        asn_db: Path | None = None,
        anonymous_db: Path | None = None,
        hosting_asns: Iterable[int] = (),
        cache_size: int = 4096,
    ) -> None:
        self._hosting_asns = frozenset(hosting_asns)
        self._city: geoip2.database.Reader | None = None
        self._asn: geoip2.database.Reader | None = None
        self._anonymous: geoip2.database.Reader | None = None
        self._resolve: Callable[[str], GeoInfo] = self._lookup
        self._forget: Callable[[], None] = lambda: None
        self._enabled = False
        try:
            self._city = _open("geoip.city_db", city_db, _CITY_TYPE)
            self._asn = _open("geoip.asn_db", asn_db, _ASN_TYPE)
            self._anonymous = _open("geoip.anonymous_db", anonymous_db, _ANONYMOUS_TYPE)
        except BaseException:
            self.close()
            raise
        if self._hosting_asns and self._asn is None:
            log.warning("geoip.hosting_asns is set but geoip.asn_db is not: no ip can match it")
        self._enabled = any(reader is not None for reader in (self._city, self._asn, self._anonymous))
        if cache_size > 0:
            cached = functools.lru_cache(maxsize=cache_size)(self._lookup)
            self._resolve, self._forget = cached, cached.cache_clear

    @property
    def has_anonymity_data(self) -> bool:
        """Whether check 8 can say anything: an anonymous-IP database, or a hosting ASN list with
        an ASN database to find the ip's ASN in. Without either every ip would look clean, so the
        check is skipped instead."""
        return self._anonymous is not None or (bool(self._hosting_asns) and self._asn is not None)

    def lookup(self, ip: str) -> GeoInfo:
        """Everything the databases know about ``ip``; empty fields for whatever they do not."""
        if not self._enabled:
            return _EMPTY
        return self._resolve(ip)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the files; later lookups answer empty rather than raise."""
        self._enabled = False
        for reader in (self._city, self._asn, self._anonymous):
            if reader is not None:
                reader.close()
        self._city = self._asn = self._anonymous = None
        self._forget()

    def _lookup(self, ip: str) -> GeoInfo:
        # IPv4-mapped IPv6 (a dual-stack listener's view of an IPv4 client) is looked up as the
        # IPv4 address: databases written for IPv4 do not alias the ::ffff:0:0/96 subtree.
        address = parse_ip(ip)
        if address is None:
            return _EMPTY
        # Taken once, so a close() from another thread cannot swap a reader for None mid-way.
        city_db, asn_db, anonymous_db = self._city, self._asn, self._anonymous
        country = region = city_name = time_zone = as_org = None
        latitude = longitude = None
        accuracy = asn = None
        vpn = public_proxy = residential_proxy = tor_exit = hosting = False
        if city_db is not None and (found := _query("city", city_db.city, address)) is not None:
            country = _str(found.country.iso_code)
            region = _str(found.subdivisions.most_specific.iso_code)
            city_name = _str(found.city.name)
            latitude = _float(found.location.latitude)
            longitude = _float(found.location.longitude)
            accuracy = _int(found.location.accuracy_radius)
            time_zone = _str(found.location.time_zone)
        if asn_db is not None and (network := _query("asn", asn_db.asn, address)) is not None:
            asn = _int(network.autonomous_system_number)
            as_org = _str(network.autonomous_system_organization)
        if (
            anonymous_db is not None
            and (flags := _query("anonymous", anonymous_db.anonymous_ip, address)) is not None
        ):
            vpn = flags.is_anonymous_vpn is True
            public_proxy = flags.is_public_proxy is True
            residential_proxy = flags.is_residential_proxy is True
            tor_exit = flags.is_tor_exit_node is True
            hosting = flags.is_hosting_provider is True
        return GeoInfo(
            country=country,
            region=region,
            city=city_name,
            latitude=latitude,
            longitude=longitude,
            accuracy_km=accuracy,
            time_zone=time_zone,
            asn=asn,
            as_org=as_org,
            vpn=vpn,
            public_proxy=public_proxy,
            residential_proxy=residential_proxy,
            tor_exit=tor_exit,
            hosting=hosting or (asn is not None and asn in self._hosting_asns),
        )


def geo_lookup(settings: GeoipSettings) -> GeoLookup:
    """The lookup for the ``geoip`` settings; ``ValueError`` naming the setting when a configured
    database cannot be used (startup reports it and stops)."""
    return GeoLookup(
        city_db=settings.city_db,
        asn_db=settings.asn_db,
        anonymous_db=settings.anonymous_db,
        hosting_asns=settings.hosting_asns,
    )


def _open(setting: str, path: Path | None, expected_type: str) -> geoip2.database.Reader | None:
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"{setting}: {path} does not exist or is not a file")
    try:
        reader = geoip2.database.Reader(path, mode=maxminddb.MODE_AUTO)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ValueError(f"{setting}: {path} is not a MaxMind DB file ({exc})") from None
    database_type = reader.metadata().database_type
    if expected_type not in database_type:
        reader.close()
        raise ValueError(
            f"{setting}: {path} is a {database_type} database; expected a {expected_type} database"
        )
    return reader


def _query(
    database: str, method: Callable[[IPv4Address | IPv6Address], _T], address: IPv4Address | IPv6Address
) -> _T | None:
    """One reader call; a miss is ``None``, so is anything the record makes the reader or geoip2's
    model raise (logged: a database that decodes badly is the operator's to replace)."""
    try:
        return method(address)
    except geoip2.errors.AddressNotFoundError:
        return None
    except Exception as exc:
        log.bind(database=database, error=type(exc).__name__).warning("geoip lookup failed")
        return None


# geoip2 models hold whatever the record holds; a record of the wrong shape must not put a
# string where check 10 does arithmetic.


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
