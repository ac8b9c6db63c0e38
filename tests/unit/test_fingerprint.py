"""Fingerprint rules (behaviour.md 6.2 to 6.5): comparison, networks, countries, baseline upkeep, travel."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from iam_grpc.core.devices import baseline_of
from iam_grpc.core.fingerprint import (
    GeoInfo,
    distance_km,
    fingerprint_mismatches,
    learn_country,
    learn_network,
    network_key,
    network_known,
    raised_baseline,
    recent_countries,
    travel_is_impossible,
)
from iam_grpc.ua import ParsedAgent

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FIREFOX = ParsedAgent(
    browser_family="Firefox",
    browser_major="121",
    browser_minor="0",
    os_family="Ubuntu",
    os_major="22",
    device_family="Other",
    device_brand=None,
    device_model=None,
    device_type="desktop",
)
IPHONE = ParsedAgent(
    browser_family="Mobile Safari",
    browser_major="17",
    os_family="iOS",
    os_major="17",
    device_family="iPhone",
    device_brand="Apple",
    device_model="iPhone",
    device_type="mobile",
)
BERLIN = GeoInfo(country="DE", region="BE", city="Berlin", latitude=52.52, longitude=13.405, accuracy_km=20)
BERLIN_NET = GeoInfo(country="DE", asn=64500)

BERLIN_POINT = (52.52, 13.405, 20)
MUNICH_POINT = (48.1374, 11.5755, 20)
SYDNEY_POINT = (-33.8688, 151.2093, 10)
NEW_YORK_POINT = (40.7128, -74.0060, 10)


def mismatches(
    baseline: dict[str, Any],
    agent: ParsedAgent,
    geo: GeoInfo = BERLIN,
    known: tuple[str, ...] = ("DE",),
    *,
    skip_country: bool = False,
) -> list[str]:
    return fingerprint_mismatches(baseline, agent, geo, list(known), skip_country=skip_country)


def with_(agent: ParsedAgent, **changes: str | None) -> ParsedAgent:
    return dataclasses.replace(agent, **changes)


# ---------------------------------------------------------------------------
# GeoInfo


def test_location_joins_what_is_known() -> None:
    """City, region and country, skipping the unknown parts; empty when nothing is known."""
    assert BERLIN.location == "Berlin, BE, DE"
    assert GeoInfo(country="US").location == "US"
    assert GeoInfo(city="Paris", country="FR").location == "Paris, FR"
    assert GeoInfo().location == ""


def test_point_needs_both_coordinates() -> None:
    """A point is (lat, lon, accuracy); without either coordinate there is none."""
    assert BERLIN.point == (52.52, 13.405, 20)
    assert GeoInfo(latitude=1.0, longitude=2.0).point == (1.0, 2.0, None)
    assert GeoInfo(latitude=1.0).point is None


def test_proxy_outranks_hosting_as_the_flagged_class() -> None:
    """A VPN in a data centre is a proxy; hosting alone is hosting; neither is no class."""
    assert GeoInfo(vpn=True, hosting=True).flagged_class == "proxy"
    assert GeoInfo(hosting=True).flagged_class == "hosting"
    assert not GeoInfo(hosting=True).anonymising
    assert GeoInfo().flagged_class is None


# ---------------------------------------------------------------------------
# check 9 (6.3)


def test_the_same_agent_from_a_known_country_passes() -> None:
    """A baseline recorded from an agent matches that agent."""
    assert mismatches(baseline_of(IPHONE), IPHONE) == []


def test_a_browser_update_passes() -> None:
    """A newer browser major than the baseline is an auto-update, not another device."""
    assert mismatches(baseline_of(with_(FIREFOX, browser_major="120")), FIREFOX) == []


def test_a_browser_downgrade_hits() -> None:
    """An older browser major than the baseline is reported."""
    assert mismatches(baseline_of(FIREFOX), with_(FIREFOX, browser_major="120")) == ["browser_major"]


def test_majors_are_compared_as_numbers() -> None:
    """Version 100 is newer than 99, although "100" < "99" as text; JSON numbers are accepted."""
    assert (
        mismatches({"browser_family": "Firefox", "browser_major": "99"}, with_(FIREFOX, browser_major="100"))
        == []
    )
    assert mismatches({"browser_family": "Firefox", "browser_major": 121}, FIREFOX) == []


def test_majors_that_are_not_numbers_must_be_equal() -> None:
    """Named versions (Windows "XP", "Vista") have no order, so only equality passes."""
    windows = with_(FIREFOX, os_family="Windows", os_major="XP")
    assert mismatches({"os_family": "Windows", "os_major": "XP"}, windows) == []
    assert mismatches({"os_family": "Windows", "os_major": "Vista"}, windows) == ["os_major"]


def test_a_browser_family_change_hits_without_comparing_versions() -> None:
    """Another browser is reported as the family only: two products' versions say nothing."""
    chrome = with_(FIREFOX, browser_family="Chrome", browser_major="80")
    assert mismatches(baseline_of(FIREFOX), chrome) == ["browser_family"]


def test_families_compare_case_insensitively() -> None:
    """Casing differences between parser versions are not a change of browser or system."""
    assert mismatches({"browser_family": "firefox", "os_family": "UBUNTU"}, FIREFOX) == []


def test_an_os_upgrade_passes() -> None:
    """A newer OS major than the baseline passes."""
    assert mismatches(baseline_of(with_(IPHONE, os_major="16")), IPHONE) == []


def test_an_os_downgrade_hits() -> None:
    """An older OS major than the baseline is reported."""
    assert mismatches(baseline_of(IPHONE), with_(IPHONE, os_major="16")) == ["os_major"]


def test_an_os_family_change_hits() -> None:
    """Another operating system is reported."""
    assert mismatches(baseline_of(FIREFOX), with_(FIREFOX, os_family="Windows", os_major="11")) == [
        "os_family"
    ]


def test_a_device_type_change_hits() -> None:
    """A desktop baseline presented from a mobile is reported."""
    assert mismatches(baseline_of(FIREFOX), with_(FIREFOX, device_type="mobile")) == ["device_type"]


def test_device_type_compares_case_insensitively() -> None:
    """The device type is compared like the families."""
    assert mismatches({"device_type": "Desktop"}, FIREFOX) == []


@pytest.mark.parametrize("placeholder", ["Other", "Generic", "Generic Smartphone", "generic tablet"])
def test_a_generic_brand_or_model_is_skipped(placeholder: str) -> None:
    """ua-parser's placeholders on either side are no evidence of another device."""
    generic = with_(IPHONE, device_brand=placeholder, device_model=placeholder)
    assert mismatches(baseline_of(IPHONE), generic) == []
    assert mismatches({"device_brand": placeholder, "device_model": placeholder}, IPHONE) == []


def test_a_different_brand_or_model_hits() -> None:
    """Two known, different brands or models are reported by name."""
    samsung = with_(IPHONE, device_brand="Samsung", device_model="SM-G991B")
    assert mismatches(baseline_of(IPHONE), samsung) == ["device_brand", "device_model"]


def test_fields_the_baseline_did_not_record_are_skipped() -> None:
    """An empty baseline, or an empty field of it, is not held against the request."""
    assert mismatches({}, IPHONE) == []
    assert mismatches({"browser_family": "", "browser_major": None}, FIREFOX) == []


def test_a_coarse_field_missing_from_the_request_hits() -> None:
    """An empty User-Agent, or one stripped of its browser, is no wildcard: every coarse field
    recorded in the baseline must be present (versions and hardware may still be unknown)."""
    assert mismatches(baseline_of(IPHONE), ParsedAgent()) == ["browser_family", "os_family", "device_type"]
    stripped = with_(FIREFOX, browser_family=None, browser_major=None)
    assert mismatches(baseline_of(FIREFOX), stripped) == ["browser_family"]
    assert mismatches(baseline_of(FIREFOX), with_(FIREFOX, browser_major=None, os_major=None)) == []


def test_an_unknown_country_hits() -> None:
    """A country outside the known countries is reported."""
    assert mismatches(baseline_of(FIREFOX), FIREFOX, GeoInfo(country="US"), ("DE", "FR")) == ["country"]


def test_a_known_country_passes_whatever_its_case() -> None:
    """Country codes are compared upper-case."""
    assert mismatches(baseline_of(FIREFOX), FIREFOX, GeoInfo(country="de"), ("FR", "DE")) == []


def test_the_country_is_skipped_for_a_flagged_and_allowed_ip() -> None:
    """With skip_country (check 8 allowed the ip) the proxy's country is not held against it."""
    assert mismatches(baseline_of(FIREFOX), FIREFOX, GeoInfo(country="US"), ("DE",), skip_country=True) == []


def test_the_country_is_skipped_without_known_countries_or_geo_data() -> None:
    """Nothing learned yet, or no country for the ip: nothing to compare."""
    assert mismatches(baseline_of(FIREFOX), FIREFOX, GeoInfo(country="US"), ()) == []
    assert mismatches(baseline_of(FIREFOX), FIREFOX, GeoInfo(), ("DE",)) == []


def test_every_failing_field_is_reported() -> None:
    """Several differences come back together, in table order."""
    other = with_(IPHONE, browser_major="16", os_major="16", device_type="tablet")
    assert mismatches(baseline_of(IPHONE), other, GeoInfo(country="AU")) == [
        "browser_major",
        "os_major",
        "device_type",
        "country",
    ]


# ---------------------------------------------------------------------------
# baseline upkeep (6.2)


def test_a_newer_major_raises_the_baseline() -> None:
    """After an update passes, the baseline holds the new versions, so going back is noticed."""
    old = baseline_of(with_(FIREFOX, browser_major="119", os_major="20"))
    raised = raised_baseline(old, FIREFOX)
    assert (raised["browser_major"], raised["os_major"]) == ("121", "22")
    assert mismatches(raised, with_(FIREFOX, browser_major="119")) == ["browser_major"]


def test_an_older_or_equal_major_leaves_the_baseline() -> None:
    """The baseline never goes down."""
    baseline = baseline_of(FIREFOX)
    assert raised_baseline(baseline, with_(FIREFOX, browser_major="100", os_major="22")) == baseline


def test_another_family_or_a_named_version_does_not_raise_the_baseline() -> None:
    """A version is raised only within the same product and only when both are numbers."""
    baseline = {"browser_family": "Firefox", "browser_major": "100", "os_family": "Windows", "os_major": "XP"}
    chrome = with_(FIREFOX, browser_family="Chrome", browser_major="200", os_family="Windows", os_major="11")
    assert raised_baseline(baseline, chrome) == baseline


def test_raising_the_baseline_leaves_the_input_and_other_fields_alone() -> None:
    """A new dict is returned; fields other than the majors are copied as they were."""
    baseline = {**baseline_of(with_(IPHONE, browser_major="16")), "extra": "kept"}
    before = copy.deepcopy(baseline)
    raised = raised_baseline(baseline, IPHONE)
    assert baseline == before
    assert raised == {**before, "browser_major": "17"}


# ---------------------------------------------------------------------------
# networks (6.4)


def test_the_network_key_of_an_ipv4_address_is_its_slash_24() -> None:
    """IPv4 addresses are grouped by /24 unless configured otherwise."""
    assert network_key("192.0.2.77") == "192.0.2.0/24"
    assert network_key("192.0.2.77", ipv4_prefix=16) == "192.0.0.0/16"


def test_the_network_key_of_an_ipv6_address_is_its_slash_56() -> None:
    """IPv6 addresses are grouped by /56 (a typical subscriber delegation) unless configured otherwise."""
    assert network_key("2001:db8:100:1::10") == "2001:db8:100::/56"
    assert network_key("2001:db8:100:1::10", ipv6_prefix=64) == "2001:db8:100:1::/64"


def test_the_network_key_of_an_ipv4_mapped_address_is_the_ipv4_network() -> None:
    """A dual-stack listener's mapped form is the same network as the plain IPv4 address."""
    assert network_key("::ffff:192.0.2.77") == "192.0.2.0/24"


@pytest.mark.parametrize("ip", ["", "unknown", "192.0.2", "2001:db8::g"])
def test_an_unparsable_ip_has_no_network_key(ip: str) -> None:
    """Garbage in the ip field yields no network, not an exception."""
    assert network_key(ip) is None


def known(*entries: tuple[str, int | None, str | None]) -> list[dict[str, Any]]:
    return [
        {"prefix": prefix, "asn": asn, "country": country, "seen_at": NOW.isoformat()}
        for prefix, asn, country in entries
    ]


def test_an_ip_in_a_known_prefix_is_known() -> None:
    """Another address of a known /24 passes without any geo data."""
    networks = known(("192.0.2.0/24", None, None))
    assert network_known(networks, "192.0.2.200", GeoInfo(), asn_match=False)


def test_an_ip_of_a_known_provider_in_a_known_country_is_known() -> None:
    """With asn_match, a new prefix of the same ASN in the same country passes."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    assert network_known(networks, "198.51.100.10", BERLIN_NET, asn_match=True)


def test_the_provider_does_not_count_with_asn_match_off() -> None:
    """Without asn_match only the prefix counts."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    assert not network_known(networks, "198.51.100.10", BERLIN_NET, asn_match=False)


def test_the_provider_counts_only_in_the_same_country() -> None:
    """One ASN spanning countries is not one network: the country must match too."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    assert not network_known(networks, "198.51.100.10", GeoInfo(country="US", asn=64500), asn_match=True)
    assert not network_known(networks, "198.51.100.10", GeoInfo(asn=64500), asn_match=True)


def test_an_unknown_network_is_not_known() -> None:
    """Another prefix of another provider is outside every known network."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    assert not network_known(networks, "203.0.113.10", GeoInfo(country="DE", asn=64501), asn_match=True)


def test_a_device_without_networks_passes() -> None:
    """The first network of a user-device is learned, not challenged."""
    assert network_known([], "203.0.113.10", GeoInfo(), asn_match=True)


def test_learning_a_new_network_appends_it() -> None:
    """A new prefix is stored with its ASN, country and time."""
    learned = learn_network([], "192.0.2.77", BERLIN_NET, NOW, max_networks=8, memory=timedelta(days=90))
    assert learned == [{"prefix": "192.0.2.0/24", "asn": 64500, "country": "DE", "seen_at": NOW.isoformat()}]


def test_learning_a_known_network_refreshes_it_in_place_of_a_duplicate() -> None:
    """Seeing a known prefix again updates its time and moves it to the most recent end."""
    earlier = NOW - timedelta(days=3)
    networks = [
        {"prefix": "192.0.2.0/24", "asn": 64500, "country": "DE", "seen_at": earlier.isoformat()},
        {"prefix": "203.0.113.0/24", "asn": 64501, "country": "DE", "seen_at": earlier.isoformat()},
    ]
    learned = learn_network(networks, "192.0.2.5", GeoInfo(), NOW, max_networks=8, memory=timedelta(days=90))
    assert [entry["prefix"] for entry in learned] == ["203.0.113.0/24", "192.0.2.0/24"]
    assert learned[-1] == {
        "prefix": "192.0.2.0/24",
        "asn": 64500,
        "country": "DE",
        "seen_at": NOW.isoformat(),
    }


def test_learning_evicts_the_least_recently_seen_beyond_the_limit() -> None:
    """Only max_networks entries are kept: the most recently seen ones."""
    networks = [
        {
            "prefix": f"198.18.{n}.0/24",
            "asn": None,
            "country": None,
            "seen_at": (NOW - timedelta(days=10 - n)).isoformat(),
        }
        for n in range(3)
    ]
    learned = learn_network(networks, "192.0.2.1", GeoInfo(), NOW, max_networks=3, memory=timedelta(days=90))
    assert [entry["prefix"] for entry in learned] == ["198.18.1.0/24", "198.18.2.0/24", "192.0.2.0/24"]


def test_learning_drops_networks_not_seen_within_the_memory() -> None:
    """Entries older than the network memory are forgotten, and so are entries without a readable time."""
    networks = [
        {
            "prefix": "198.18.1.0/24",
            "asn": None,
            "country": None,
            "seen_at": (NOW - timedelta(days=91)).isoformat(),
        },
        {
            "prefix": "198.18.2.0/24",
            "asn": None,
            "country": None,
            "seen_at": (NOW - timedelta(days=89)).isoformat(),
        },
        {"prefix": "198.18.3.0/24", "asn": None, "country": None, "seen_at": "yesterday"},
    ]
    learned = learn_network(networks, "192.0.2.1", GeoInfo(), NOW, max_networks=8, memory=timedelta(days=90))
    assert [entry["prefix"] for entry in learned] == ["198.18.2.0/24", "192.0.2.0/24"]


def test_learning_leaves_the_input_unchanged() -> None:
    """A new list of new dicts is returned; the stored one is not modified."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    before = copy.deepcopy(networks)
    learn_network(
        networks, "192.0.2.1", BERLIN_NET, NOW + timedelta(hours=1), max_networks=8, memory=timedelta(days=90)
    )
    assert networks == before


def test_an_unparsable_ip_teaches_no_network() -> None:
    """Without a network key nothing is added; expiry still applies."""
    networks = known(("192.0.2.0/24", 64500, "DE"))
    assert (
        learn_network(networks, "unknown", BERLIN_NET, NOW, max_networks=8, memory=timedelta(days=90))
        == networks
    )


def codes(entries: list[dict[str, str]]) -> list[str]:
    return [entry["code"] for entry in entries]


def countries(*items: tuple[str, timedelta]) -> list[dict[str, str]]:
    """Stored entries: (code, how long ago it was seen)."""
    return [{"code": code, "seen_at": (NOW - ago).isoformat()} for code, ago in items]


def test_learning_a_country_keeps_the_most_recent_last() -> None:
    """A new country is appended; a known one moves to the end with a fresh time; codes are
    upper-case."""
    assert learn_country([], "de", NOW, max_countries=5) == [{"code": "DE", "seen_at": NOW.isoformat()}]
    day = timedelta(days=1)
    assert codes(learn_country(countries(("DE", day), ("FR", day)), "DE", NOW)) == ["FR", "DE"]
    assert learn_country(countries(("DE", day)), None, NOW) == countries(("DE", day))


def test_learning_a_country_keeps_at_most_the_limit() -> None:
    """The oldest countries are dropped beyond max_countries."""
    known = countries(
        *((code, timedelta(days=5 - i)) for i, code in enumerate(["AT", "CH", "DE", "FR", "IT"]))
    )
    assert codes(learn_country(known, "NL", NOW, max_countries=5)) == ["CH", "DE", "FR", "IT", "NL"]
    assert learn_country(known, "NL", NOW, max_countries=0) == []


def test_a_country_not_seen_for_90_days_is_forgotten() -> None:
    """6.2: up to 5 codes seen in the last 90 days: older ones are dropped when the device learns,
    and never count as known even before that (a device not written for months)."""
    known = countries(("DE", timedelta(days=91)), ("FR", timedelta(days=89)))
    assert codes(learn_country(known, "IT", NOW, memory=timedelta(days=90))) == ["FR", "IT"]
    assert recent_countries(known, NOW, memory=timedelta(days=90)) == ["FR"]
    assert recent_countries(known, NOW + timedelta(days=2), memory=timedelta(days=90)) == []


def test_countries_stored_as_bare_codes_or_garbage_are_read_safely() -> None:
    """A bare code (the format before countries were timed) starts its 90 days now; entries without
    a code or with an unreadable time are dropped, not kept forever."""
    stored: list[Any] = ["de", {"code": "FR", "seen_at": "yesterday"}, {"seen_at": NOW.isoformat()}, 7]
    assert recent_countries(stored, NOW) == ["DE"]
    assert learn_country(stored, None, NOW) == [{"code": "DE", "seen_at": NOW.isoformat()}]


def test_an_expired_country_is_not_compared() -> None:
    """Check 9 gets only the recent countries: with the single known country expired, a new
    country is no mismatch (nothing learned to compare with)."""
    agent = ParsedAgent(browser_family="Firefox", browser_major="120", os_family="Linux")
    paris = GeoInfo(country="FR")
    baseline = baseline_of(agent)
    old = countries(("DE", timedelta(days=120)))
    assert fingerprint_mismatches(baseline, agent, paris, ["DE"]) == ["country"]
    assert fingerprint_mismatches(baseline, agent, paris, recent_countries(old, NOW)) == []


# ---------------------------------------------------------------------------
# impossible travel (6.5)


def test_distance_is_the_great_circle_distance() -> None:
    """Haversine on a 6371 km sphere: Berlin-Munich about 504 km, a point to itself 0."""
    assert distance_km(52.52, 13.405, 48.1374, 11.5755) == pytest.approx(504, abs=2)
    assert distance_km(10.0, 20.0, 10.0, 20.0) == 0
    assert distance_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(20015.1, abs=0.1)


def test_berlin_to_sydney_in_an_hour_hits() -> None:
    """16,000 km in one hour is impossible."""
    assert travel_is_impossible(BERLIN_POINT, NOW - timedelta(hours=1), SYDNEY_POINT, NOW)


def test_berlin_to_munich_in_ten_minutes_passes() -> None:
    """504 km less both 20 km radii is under the 500 km minimum, however fast."""
    assert not travel_is_impossible(BERLIN_POINT, NOW - timedelta(minutes=10), MUNICH_POINT, NOW)


def test_berlin_to_new_york_in_twenty_hours_passes() -> None:
    """About 6,400 km in 20 hours is a flight (about 320 km/h)."""
    assert not travel_is_impossible(BERLIN_POINT, NOW - timedelta(hours=20), NEW_YORK_POINT, NOW)


def test_an_unknown_accuracy_counts_as_fifty_km() -> None:
    """About 589 km apart: 0 km radii leave 589 km (hit), unknown radii leave 489 km (pass)."""
    a, b = (0.0, 0.0), (0.0, 5.3)
    assert travel_is_impossible((*a, 0), NOW - timedelta(minutes=30), (*b, 0), NOW)
    assert not travel_is_impossible((*a, None), NOW - timedelta(minutes=30), (*b, None), NOW)


def test_elapsed_time_counts_at_least_a_quarter_hour() -> None:
    """600 km one minute apart is judged as 600 km in 15 min (2,400 km/h), not as 36,000 km/h."""
    previous, current = (0.0, 0.0, 0), (0.0, 5.396, 0)  # 600 km
    assert not travel_is_impossible(previous, NOW - timedelta(minutes=1), current, NOW, max_kmh=3000)
    assert travel_is_impossible(previous, NOW - timedelta(minutes=1), current, NOW, max_kmh=2000)


def test_a_previous_point_in_the_future_uses_the_quarter_hour() -> None:
    """A clock that went backwards between replicas does not divide by zero or a negative time."""
    assert travel_is_impossible(BERLIN_POINT, NOW + timedelta(minutes=5), SYDNEY_POINT, NOW)
