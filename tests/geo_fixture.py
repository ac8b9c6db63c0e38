"""GeoIP test databases, written at test time with mmdb-writer (no .mmdb file lives in git).

``write_geo_databases(folder, networks)`` writes a City, an ASN and an
Anonymous IP database in the layouts geoip2's own readers decode, from one
``GeoRecord`` per CIDR. A record goes into each database only if it has data
for it, as with the real products (the Anonymous IP database lists flagged
networks only), so every database has its own misses.

``DEFAULT_NETWORKS`` is a ready-made world for anomaly tests; use the address
constants below rather than literals, so a test says which place it means.
Addresses come from the documentation blocks (RFC 5737: 192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24; RFC 3849: 2001:db8::/32) and, because only
three IPv4 documentation /24s exist, from the benchmarking block 198.18.0.0/15
(RFC 2544). ASNs are the documentation ASNs 64496-64511 (RFC 5398).

=====================  ======================  ======  =========================================
constant               network                 ASN     what it is
=====================  ======================  ======  =========================================
BERLIN_IP, _IP_2       192.0.2.0/24            64500   Berlin, BE, DE (two hosts, one /24)
BERLIN_OTHER_NET_IP    198.51.100.0/24         64500   Berlin, same provider, another /24
MUNICH_IP              203.0.113.0/24          64501   Munich, BY, DE (same country, other ASN)
NEW_YORK_IP            198.18.1.0/24           64502   New York, NY, US
SYDNEY_IP              198.18.2.0/24           64503   Sydney, NSW, AU (impossible from Berlin)
VPN_IP                 198.18.3.0/24           64504   Amsterdam, NL: VPN
HOSTING_IP             198.18.4.0/24           64505   Ashburn, US: hosting per the database
CLOUD_IP               198.18.5.0/24           64510   Dublin, IE: not flagged; hosting only via
                                                       ``geoip.hosting_asns = [CLOUD_ASN]``
TOR_IP                 198.18.6.0/24           64509   NL: Tor exit node
PUBLIC_PROXY_IP        198.18.7.0/24           64507   US: public proxy
RESIDENTIAL_PROXY_IP   198.18.8.0/24           64508   Paris, FR: residential proxy
BERLIN_V6_IP, _V6_IP_2 2001:db8:100::/48       64500   Berlin, DE over IPv6 (one /56)
BERLIN_V6_OTHER_NET_IP 2001:db8:100::/48       64500   same /48, another /56
MISS_IP, MISS_V6_IP    (in no database)                every field empty
=====================  ======================  ======  =========================================

Berlin-Munich is about 504 km, so with the 20 km radii below the effective
distance (464 km) stays under the 500 km travel threshold; Berlin-Sydney is
about 16,000 km and Berlin-New York about 6,400 km.

IPv4 networks are stored in an IPv6 tree under ``::/96`` (``ipv4_compatible``),
which is where MaxMind readers look IPv4 addresses up. Unlike MaxMind's own
files, ``::ffff:0:0/96`` is not aliased, so an IPv4-mapped address finds
nothing unless the caller unmaps it first (as ``iam_grpc.geo`` does).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

from iam_grpc.config import GeoipSettings

__all__ = [
    "BERLIN_ASN",
    "BERLIN_IP",
    "BERLIN_IP_2",
    "BERLIN_OTHER_NET_IP",
    "BERLIN_V6_IP",
    "BERLIN_V6_IP_2",
    "BERLIN_V6_OTHER_NET_IP",
    "CLOUD_ASN",
    "CLOUD_IP",
    "DEFAULT_NETWORKS",
    "HOSTING_IP",
    "MISS_IP",
    "MISS_V6_IP",
    "MUNICH_ASN",
    "MUNICH_IP",
    "NEW_YORK_IP",
    "PUBLIC_PROXY_IP",
    "RESIDENTIAL_PROXY_IP",
    "SYDNEY_IP",
    "TOR_IP",
    "VPN_IP",
    "GeoPaths",
    "GeoRecord",
    "write_default_geo_databases",
    "write_geo_databases",
]

CITY_DATABASE_TYPE = "GeoIP2-City"
ASN_DATABASE_TYPE = "GeoLite2-ASN"
ANONYMOUS_DATABASE_TYPE = "GeoIP2-Anonymous-IP"


@dataclass(frozen=True, slots=True)
class GeoRecord:
    """What the three databases say about one network; empty fields are left out of the record."""

    country: str | None = None
    region: str | None = None
    city: str | None = None
    lat: float | None = None
    lon: float | None = None
    accuracy_km: int | None = None
    time_zone: str | None = None
    asn: int | None = None
    org: str | None = None
    vpn: bool = False
    public_proxy: bool = False
    residential_proxy: bool = False
    tor_exit: bool = False
    hosting: bool = False

    def city_record(self) -> dict[str, Any] | None:
        """The GeoIP2 City layout, or ``None`` when there is no location data."""
        record: dict[str, Any] = {}
        if self.country:
            record["country"] = {"iso_code": self.country, "names": {"en": self.country}}
        if self.region:
            record["subdivisions"] = [{"iso_code": self.region}]
        if self.city:
            record["city"] = {"names": {"en": self.city}}
        location = {
            key: value
            for key, value in (
                ("latitude", self.lat),
                ("longitude", self.lon),
                ("accuracy_radius", self.accuracy_km),
                ("time_zone", self.time_zone),
            )
            if value is not None
        }
        if location:
            record["location"] = location
        return record or None

    def asn_record(self) -> dict[str, Any] | None:
        """The GeoLite2 ASN layout, or ``None`` without an ASN."""
        if self.asn is None:
            return None
        record: dict[str, Any] = {"autonomous_system_number": self.asn}
        if self.org:
            record["autonomous_system_organization"] = self.org
        return record

    def anonymous_record(self) -> dict[str, Any] | None:
        """The GeoIP2 Anonymous IP layout, or ``None`` when nothing is flagged (the real database
        holds flagged networks only). ``is_anonymous`` is set for any flag, as MaxMind does."""
        flags = {
            "is_anonymous_vpn": self.vpn,
            "is_public_proxy": self.public_proxy,
            "is_residential_proxy": self.residential_proxy,
            "is_tor_exit_node": self.tor_exit,
            "is_hosting_provider": self.hosting,
        }
        set_flags = {name: True for name, value in flags.items() if value}
        if not set_flags:
            return None
        return {"is_anonymous": True, **set_flags}


@dataclass(frozen=True, slots=True)
class GeoPaths:
    """Where ``write_geo_databases`` put the three files."""

    city: Path
    asn: Path
    anonymous: Path

    def settings(self, hosting_asns: tuple[int, ...] = ()) -> GeoipSettings:
        """The ``geoip`` settings group pointing at these files."""
        return GeoipSettings(
            city_db=self.city,
            asn_db=self.asn,
            anonymous_db=self.anonymous,
            hosting_asns=list(hosting_asns),
        )

    def environ(self) -> dict[str, str]:
        """The same as environment variables, for a service started from the environment."""
        return {
            "IAM_GEOIP_CITY_DB": str(self.city),
            "IAM_GEOIP_ASN_DB": str(self.asn),
            "IAM_GEOIP_ANONYMOUS_DB": str(self.anonymous),
        }


def write_geo_databases(folder: Path, networks: Mapping[str, GeoRecord]) -> GeoPaths:
    """Write ``city.mmdb``, ``asn.mmdb`` and ``anonymous.mmdb`` into ``folder`` from CIDR-keyed
    records (IPv4 and IPv6 mixed; a more specific network inside a broader one wins)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = GeoPaths(city=folder / "city.mmdb", asn=folder / "asn.mmdb", anonymous=folder / "anonymous.mmdb")
    writers = {
        "city": _writer(CITY_DATABASE_TYPE),
        "asn": _writer(ASN_DATABASE_TYPE),
        "anonymous": _writer(ANONYMOUS_DATABASE_TYPE),
    }
    # Broad networks first: mmdb-writer splits an existing leaf when a subnet arrives, but a
    # broad network inserted later would overwrite the subnets below it.
    ordered = sorted(networks.items(), key=lambda item: ipaddress.ip_network(item[0]).prefixlen)
    for cidr, geo in ordered:
        network = IPSet([str(ipaddress.ip_network(cidr))])
        for name, record in (
            ("city", geo.city_record()),
            ("asn", geo.asn_record()),
            ("anonymous", geo.anonymous_record()),
        ):
            if record is not None:
                writers[name].insert_network(network, record)
    writers["city"].to_db_file(str(paths.city))
    writers["asn"].to_db_file(str(paths.asn))
    writers["anonymous"].to_db_file(str(paths.anonymous))
    return paths


def write_default_geo_databases(folder: Path) -> GeoPaths:
    """``write_geo_databases`` with ``DEFAULT_NETWORKS``."""
    return write_geo_databases(folder, DEFAULT_NETWORKS)


def _writer(database_type: str) -> MMDBWriter:
    return MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type=database_type,
        languages=["en"],
        description=f"iam-grpc test {database_type}",
    )


# ---------------------------------------------------------------------------
# the default world

BERLIN_ASN = 64500
MUNICH_ASN = 64501
CLOUD_ASN = 64510

BERLIN_IP = "192.0.2.10"
BERLIN_IP_2 = "192.0.2.77"
BERLIN_OTHER_NET_IP = "198.51.100.10"
MUNICH_IP = "203.0.113.10"
NEW_YORK_IP = "198.18.1.10"
SYDNEY_IP = "198.18.2.10"
VPN_IP = "198.18.3.10"
HOSTING_IP = "198.18.4.10"
CLOUD_IP = "198.18.5.10"
TOR_IP = "198.18.6.10"
PUBLIC_PROXY_IP = "198.18.7.10"
RESIDENTIAL_PROXY_IP = "198.18.8.10"
BERLIN_V6_IP = "2001:db8:100:1::10"
BERLIN_V6_IP_2 = "2001:db8:100:2::20"  # same /56 as BERLIN_V6_IP
BERLIN_V6_OTHER_NET_IP = "2001:db8:100:100::10"  # same /48 and ASN, another /56
MISS_IP = "198.18.200.1"
MISS_V6_IP = "2001:db8:ffff::1"

_BERLIN = GeoRecord(
    country="DE",
    region="BE",
    city="Berlin",
    lat=52.5200,
    lon=13.4050,
    accuracy_km=20,
    time_zone="Europe/Berlin",
    asn=BERLIN_ASN,
    org="Example Telecom DE",
)

DEFAULT_NETWORKS: Mapping[str, GeoRecord] = {
    "192.0.2.0/24": _BERLIN,
    "198.51.100.0/24": _BERLIN,
    "2001:db8:100::/48": _BERLIN,
    "203.0.113.0/24": GeoRecord(
        country="DE",
        region="BY",
        city="Munich",
        lat=48.1374,
        lon=11.5755,
        accuracy_km=20,
        time_zone="Europe/Berlin",
        asn=MUNICH_ASN,
        org="Example Mobile DE",
    ),
    "198.18.1.0/24": GeoRecord(
        country="US",
        region="NY",
        city="New York",
        lat=40.7128,
        lon=-74.0060,
        accuracy_km=10,
        time_zone="America/New_York",
        asn=64502,
        org="Example Cable US",
    ),
    "198.18.2.0/24": GeoRecord(
        country="AU",
        region="NSW",
        city="Sydney",
        lat=-33.8688,
        lon=151.2093,
        accuracy_km=10,
        time_zone="Australia/Sydney",
        asn=64503,
        org="Example Broadband AU",
    ),
    "198.18.3.0/24": GeoRecord(
        country="NL",
        region="NH",
        city="Amsterdam",
        lat=52.3676,
        lon=4.9041,
        accuracy_km=100,
        time_zone="Europe/Amsterdam",
        asn=64504,
        org="Example VPN",
        vpn=True,
    ),
    "198.18.4.0/24": GeoRecord(
        country="US",
        region="VA",
        city="Ashburn",
        lat=39.0438,
        lon=-77.4874,
        accuracy_km=1000,
        time_zone="America/New_York",
        asn=64505,
        org="Example Hosting",
        hosting=True,
    ),
    "198.18.5.0/24": GeoRecord(
        country="IE",
        region="L",
        city="Dublin",
        lat=53.3498,
        lon=-6.2603,
        accuracy_km=1000,
        time_zone="Europe/Dublin",
        asn=CLOUD_ASN,
        org="Example Cloud",
    ),
    "198.18.6.0/24": GeoRecord(
        country="NL", lat=52.3824, lon=4.8995, accuracy_km=100, asn=64509, org="Example Relay", tor_exit=True
    ),
    "198.18.7.0/24": GeoRecord(
        country="US",
        lat=37.751,
        lon=-97.822,
        accuracy_km=1000,
        asn=64507,
        org="Example Proxy",
        public_proxy=True,
    ),
    "198.18.8.0/24": GeoRecord(
        country="FR",
        region="IDF",
        city="Paris",
        lat=48.8566,
        lon=2.3522,
        accuracy_km=20,
        time_zone="Europe/Paris",
        asn=64508,
        org="Example Residential FR",
        residential_proxy=True,
    ),
}
