"""Email domain checks (behaviour.md 2.3 step 4, 2.7 step 3) against a real DNS
server on loopback: the MX lookup adapter, then the policy that uses it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from loguru import logger

from iam_grpc.core.email_domains import EmailDomainPolicy
from iam_grpc.dns import MailDomainLookup
from iam_grpc.errors import EmailDomainRejected
from tests.dns_server import SERVFAIL, SILENT, DnsServer, Zone

TIMEOUT = timedelta(milliseconds=300)
MARGIN = 0.15  # seconds of scheduling slack allowed past TIMEOUT
FAST = TIMEOUT.total_seconds() / 3  # "did not wait for the timeout"

ZONE: Zone = {
    "mx.test": {"MX": ["10 mail.mx.test."]},
    "a-only.test": {"A": ["192.0.2.10"]},
    "aaaa-only.test": {"AAAA": ["2001:db8::10"]},
    "no-mail.test": {"TXT": ['"v=spf1 -all"']},
    "null-mx.test": {"MX": ["0 ."], "A": ["192.0.2.20"]},
    "servfail.test": SERVFAIL,
    "silent.test": SILENT,
    "v4-now-v6-silent.test": {"A": ["192.0.2.30"], "AAAA": SILENT},
    "no-v4-v6-silent.test": {"AAAA": SILENT},
    "big.test": {"MX": ["10 mail.big.test."]},
    "xn--bcher-kva.test": {"MX": ["10 mail.xn--bcher-kva.test."]},
    "mailinator.com": SILENT,
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE, tcp_only=["big.test"]) as server:
        yield server


@pytest.fixture
def unknowns() -> list[str]:
    return []


@pytest.fixture
def lookup(dns_server: DnsServer, unknowns: list[str]) -> MailDomainLookup:
    return MailDomainLookup(timeout=TIMEOUT, nameservers=[dns_server.nameserver], on_unknown=unknowns.append)


async def timed(lookup: MailDomainLookup, domain: str) -> tuple[bool | None, float]:
    started = time.perf_counter()
    result = await lookup.accepts_mail(domain)
    return result, time.perf_counter() - started


# -- the lookup ---------------------------------------------------------------------------------


async def test_mx_records_accept_mail(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """A domain with MX records accepts mail."""
    assert await lookup.accepts_mail("mx.test") is True
    assert unknowns == []


async def test_ipv4_address_is_an_implicit_mx(lookup: MailDomainLookup) -> None:
    """Without MX, an A record accepts mail (RFC 5321 implicit MX)."""
    assert await lookup.accepts_mail("a-only.test") is True


async def test_ipv6_address_is_an_implicit_mx(lookup: MailDomainLookup) -> None:
    """Without MX, an AAAA record accepts mail."""
    assert await lookup.accepts_mail("aaaa-only.test") is True


async def test_name_without_mail_records_refuses_mail(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """NOERROR with no MX, A or AAAA means the domain receives no mail."""
    assert await lookup.accepts_mail("no-mail.test") is False
    assert unknowns == []


async def test_nonexistent_domain_refuses_mail(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """NXDOMAIN means the domain receives no mail."""
    assert await lookup.accepts_mail("nowhere.test") is False
    assert unknowns == []


async def test_null_mx_refuses_mail_despite_an_address(lookup: MailDomainLookup) -> None:
    """An RFC 7505 null MX refuses mail, even when the domain has an A record."""
    assert await lookup.accepts_mail("null-mx.test") is False


async def test_servfail_is_unknown(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """SERVFAIL answers None at once and reports "servfail"."""
    result, elapsed = await timed(lookup, "servfail.test")
    assert result is None
    assert unknowns == ["servfail"]
    assert elapsed < FAST


async def test_silence_is_unknown_within_the_timeout(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """A server that never answers yields None within the timeout and reports "timeout"."""
    result, elapsed = await timed(lookup, "silent.test")
    assert result is None
    assert unknowns == ["timeout"]
    assert elapsed <= TIMEOUT.total_seconds() + MARGIN


async def test_one_timeout_covers_mx_and_address_queries(
    lookup: MailDomainLookup, unknowns: list[str]
) -> None:
    """MX, then A and AAAA, all fit in one timeout; a silent family makes "no address" unknown."""
    result, elapsed = await timed(lookup, "no-v4-v6-silent.test")
    assert result is None
    assert unknowns == ["timeout"]
    assert elapsed <= TIMEOUT.total_seconds() + MARGIN


async def test_first_address_found_settles_it(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """An A record answers True without waiting for an AAAA query that never returns."""
    result, elapsed = await timed(lookup, "v4-now-v6-silent.test")
    assert result is True
    assert elapsed < FAST
    assert unknowns == []


async def test_truncated_answer_is_asked_again_over_tcp(
    lookup: MailDomainLookup, dns_server: DnsServer
) -> None:
    """A truncated UDP answer is retried over TCP on the same nameserver port."""
    assert await lookup.accepts_mail("big.test") is True
    assert {query.transport for query in dns_server.queries_for("big.test")} == {"udp", "tcp"}


async def test_idna_domain_is_asked_as_given(lookup: MailDomainLookup, dns_server: DnsServer) -> None:
    """An IDNA ASCII domain is looked up under that exact name, not searched or rewritten."""
    assert await lookup.accepts_mail("xn--bcher-kva.test") is True
    assert [q.rdtype for q in dns_server.queries_for("xn--bcher-kva.test")] == ["MX"]


async def test_impossible_name_refuses_mail_without_asking(
    lookup: MailDomainLookup, dns_server: DnsServer, unknowns: list[str]
) -> None:
    """A name DNS cannot hold (an empty label) is False without a query."""
    before = len(dns_server.queries)
    assert await lookup.accepts_mail("a..b.test") is False
    assert len(dns_server.queries) == before
    assert unknowns == []


async def test_unreachable_nameserver_is_unknown(unknowns: list[str]) -> None:
    """A nameserver port with nothing listening is unknown after the timeout (dnspython's
    unconnected UDP socket never sees the ICMP refusal)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    lookup = MailDomainLookup(
        timeout=TIMEOUT, nameservers=[f"127.0.0.1:{closed_port}"], on_unknown=unknowns.append
    )
    result, elapsed = await timed(lookup, "mx.test")
    assert result is None
    assert unknowns == ["timeout"]
    assert elapsed <= TIMEOUT.total_seconds() + MARGIN


async def test_ipv6_nameserver_with_port() -> None:
    """A nameserver written "[::1]:port" is asked over IPv6 on that port."""
    with DnsServer(ZONE, host="::1") as server:
        lookup = MailDomainLookup(timeout=TIMEOUT, nameservers=[server.nameserver])
        assert await lookup.accepts_mail("mx.test") is True
        assert server.queries_for("mx.test")


def test_nameserver_must_be_an_ip_address() -> None:
    """A host name as nameserver is refused at construction (resolving it would need DNS)."""
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        MailDomainLookup(timeout=TIMEOUT, nameservers=["dns.example:53"])


async def test_event_loop_keeps_running_during_a_lookup(lookup: MailDomainLookup) -> None:
    """While a lookup waits on a silent server, other coroutines keep running."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await lookup.accepts_mail("silent.test")
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
    assert ticks >= TIMEOUT.total_seconds() / 0.01 / 2


async def test_unknown_answer_logs_one_constant_warning(lookup: MailDomainLookup) -> None:
    """An unknown answer logs one WARNING with a constant message and the failure as a field."""
    records: list[Any] = []
    sink = logger.add(lambda message: records.append(message.record), level="WARNING")
    try:
        await lookup.accepts_mail("servfail.test")
    finally:
        logger.remove(sink)
    assert len(records) == 1
    record = records[0]
    assert record["level"].name == "WARNING"
    assert record["message"] == "mail domain lookup inconclusive"
    assert record["extra"]["failure"] == "servfail"
    assert record["extra"]["domain"] == "servfail.test"


# -- the policy ---------------------------------------------------------------------------------


async def test_disposable_domain_is_rejected() -> None:
    """A domain on the disposable blocklist is rejected."""
    with pytest.raises(EmailDomainRejected):
        await EmailDomainPolicy(disposable=True).check("mailinator.com")


async def test_subdomain_of_disposable_domain_is_rejected() -> None:
    """A subdomain of a listed disposable domain is rejected too."""
    policy = EmailDomainPolicy(disposable=True)
    assert policy.is_disposable("x.mailinator.com")
    with pytest.raises(EmailDomainRejected):
        await policy.check("x.mailinator.com")


async def test_matching_ignores_case_and_final_dot() -> None:
    """Matching is case-insensitive and ignores a trailing dot."""
    with pytest.raises(EmailDomainRejected):
        await EmailDomainPolicy(disposable=True).check("X.Mailinator.COM.")


async def test_ordinary_domain_is_not_disposable() -> None:
    """A mainstream provider is not disposable and passes."""
    policy = EmailDomainPolicy(disposable=True)
    assert not policy.is_disposable("gmail.com")
    await policy.check("gmail.com")


async def test_allow_list_overrides_the_blocklist() -> None:
    """An allowed domain, and its subdomains, pass the disposable check."""
    policy = EmailDomainPolicy(disposable=True, allow_domains=["Mailinator.com"])
    assert not policy.is_disposable("x.mailinator.com")
    await policy.check("mailinator.com")
    await policy.check("x.mailinator.com")


async def test_deny_list_rejects_domain_and_subdomains() -> None:
    """A denied domain and its subdomains are rejected, whatever else is configured."""
    policy = EmailDomainPolicy(disposable=False, allow_domains=["corp.test"], deny_domains=["corp.test"])
    for domain in ("corp.test", "mail.corp.test"):
        with pytest.raises(EmailDomainRejected):
            await policy.check(domain)
    await policy.check("notcorp.test")


async def test_disposable_check_off_lets_listed_domains_pass() -> None:
    """With the disposable check off, a listed domain passes."""
    policy = EmailDomainPolicy(disposable=False)
    assert not policy.is_disposable("mailinator.com")
    await policy.check("mailinator.com")


def test_list_entries_are_validated_at_construction() -> None:
    """A list entry that is not an IDNA ASCII domain is refused when the policy is built."""
    with pytest.raises(ValueError, match="deny_domains"):
        EmailDomainPolicy(disposable=True, deny_domains=["*.example.com"])
    with pytest.raises(ValueError, match="allow_domains"):
        EmailDomainPolicy(disposable=True, allow_domains=["bücher.example"])


async def test_domain_without_mail_is_rejected(lookup: MailDomainLookup) -> None:
    """A domain DNS says receives no mail (NXDOMAIN, no records, null MX) is rejected."""
    policy = EmailDomainPolicy(disposable=True, mail_lookup=lookup)
    for domain in ("nowhere.test", "no-mail.test", "null-mx.test"):
        with pytest.raises(EmailDomainRejected):
            await policy.check(domain)


async def test_domain_with_mail_passes(lookup: MailDomainLookup, dns_server: DnsServer) -> None:
    """A non-disposable domain with MX passes after DNS was asked; the same policy refuses a
    domain without mail, so the pass is DNS's answer and not a skipped check."""
    policy = EmailDomainPolicy(disposable=True, mail_lookup=lookup)
    assert await policy.check("mx.test") is None
    assert [q.rdtype for q in dns_server.queries_for("mx.test")][:1] == ["MX"]
    with pytest.raises(EmailDomainRejected):
        await policy.check("no-mail.test")


async def test_unknown_lookup_passes(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """A lookup that times out or fails lets the domain through (fail open)."""
    policy = EmailDomainPolicy(disposable=True, mail_lookup=lookup)
    assert await policy.check("silent.test") is None
    assert await policy.check("servfail.test") is None
    assert unknowns == ["timeout", "servfail"]


async def test_lookup_skipped_without_a_lookup(dns_server: DnsServer) -> None:
    """Without a mail lookup, DNS is not asked and a nonexistent domain passes the lists."""
    await EmailDomainPolicy(disposable=True).check("skipped.test")
    assert dns_server.queries_for("skipped.test") == []


async def test_list_rejection_does_not_wait_for_dns(
    lookup: MailDomainLookup, dns_server: DnsServer, unknowns: list[str]
) -> None:
    """A disposable domain is rejected at once while DNS stays silent; the abandoned lookup
    sends nothing and reports nothing."""
    policy = EmailDomainPolicy(disposable=True, mail_lookup=lookup)
    started = time.perf_counter()
    with pytest.raises(EmailDomainRejected):
        await policy.check("mailinator.com")
    assert time.perf_counter() - started < FAST
    await asyncio.sleep(TIMEOUT.total_seconds() + MARGIN)
    assert unknowns == []
    assert dns_server.queries_for("mailinator.com") == []


async def test_accepted_domain_waits_only_for_dns(lookup: MailDomainLookup, unknowns: list[str]) -> None:
    """A domain the lists accept is held only as long as DNS takes: a silent server costs the
    timeout and no more, then the domain passes."""
    policy = EmailDomainPolicy(disposable=True, allow_domains=["mailinator.com"], mail_lookup=lookup)
    started = time.perf_counter()
    await policy.check("mailinator.com")
    assert time.perf_counter() - started <= TIMEOUT.total_seconds() + MARGIN
    assert unknowns == ["timeout"]
