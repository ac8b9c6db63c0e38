"""Does a mail domain accept mail? An MX lookup over DNS (behaviour.md 2.3 step 4).

Three answers, because DNS has three:

- ``True``: the domain names a mail exchanger (MX), or has no MX but an address
  (A or AAAA), which RFC 5321 section 5.1 treats as an implicit MX.
- ``False``: the name does not exist (NXDOMAIN), exists with none of those
  records, or publishes the RFC 7505 "null MX" (exchange ``.``), the domain
  owner's own statement that it receives no mail.
- ``None``: DNS did not say (no server answered within the budget, SERVFAIL,
  any other failure). Callers fail open on ``None``: a resolver outage must not
  stop people from signing up, so it is counted (``on_unknown``) and logged
  instead of rejected.

The whole answer, MX and the A/AAAA fallback together, fits in one time budget.
dnspython's own ``lifetime`` bounds each query, but it sleeps a back-off between
retry rounds without checking the clock, so an asyncio deadline around the
whole lookup is the bound that holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from datetime import timedelta

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.MX import MX

from iam_grpc.config import _split_host_port
from iam_grpc.logging import component_logger

__all__ = ["MailDomainLookup"]

log = component_logger("iam.dns")


class MailDomainLookup:
    """MX lookup with A/AAAA fallback through dnspython's asyncio resolver.

    ``nameservers`` are ``"ip"`` or ``"ip:port"`` (IPv6 as ``"[::1]:53"``);
    empty means the system resolver from ``/etc/resolv.conf``, read once here
    rather than on every call, so no lookup touches the disk from the event loop.
    ``on_unknown`` receives ``"timeout"``, ``"servfail"`` or ``"error"`` each time
    a lookup ends without an answer (a metrics hook).
    """

    def __init__(
        self,
        *,
        timeout: timedelta,
        nameservers: Sequence[str] = (),
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        budget = timeout.total_seconds()
        if budget <= 0:
            raise ValueError("timeout must be positive")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(item) for item in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        # Split the budget between the servers so one dead server cannot use all of it
        # before the next is asked.
        resolver.timeout = budget / max(1, len(resolver.nameservers))
        resolver.lifetime = budget
        self._resolver = resolver
        self._budget = budget
        self._on_unknown = on_unknown
        # Chosen now: the default backend is sniffed and its module imported on first use,
        # which would happen inside a request.
        self._backend = dns.asyncbackend.get_backend("asyncio")

    async def accepts_mail(self, domain: str) -> bool | None:
        """``domain`` is IDNA ASCII (``xn--bcher-kva.example``); see the module docstring."""
        try:
            name = dns.name.from_text(domain)
        except dns.exception.DNSException:
            # Empty or over-long labels: no such name can exist in DNS, so it receives no mail.
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        try:
            async with asyncio.timeout_at(deadline):
                return await self._has_mail_host(name, deadline)
        except (TimeoutError, dns.exception.Timeout):
            self._unknown("timeout", domain, None)
        except dns.resolver.NoNameservers as exc:
            # Every server gave up on the query: SERVFAIL, REFUSED, a malformed or TCP-truncated reply.
            self._unknown("servfail", domain, exc)
        except (dns.exception.DNSException, OSError) as exc:
            self._unknown("error", domain, exc)
        return None

    def _unknown(self, kind: str, domain: str, exc: BaseException | None) -> None:
        bound = log.bind(failure=kind, domain=domain)
        if exc is not None:
            bound = bound.bind(error=type(exc).__name__)
        # ``failure``, not ``kind``: the log setup reserves ``kind`` to route records to sinks.
        bound.warning("mail domain lookup inconclusive")
        if self._on_unknown is not None:
            self._on_unknown(kind)

    async def _has_mail_host(self, name: dns.name.Name, deadline: float) -> bool:
        try:
            exchangers = await self._records(name, dns.rdatatype.MX, deadline)
        except dns.resolver.NXDOMAIN:
            return False
        if exchangers is None:
            return await self._has_address(name, deadline)
        # A null MX (exchange ".") names no host; any other exchanger is a real one.
        return any(isinstance(mx, MX) and mx.exchange != dns.name.root for mx in exchangers)

    async def _has_address(self, name: dns.name.Name, deadline: float) -> bool:
        """A or AAAA, asked together; the first address found settles it."""
        queries = [
            asyncio.create_task(self._records(name, rdtype, deadline))
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        failure: BaseException | None = None
        try:
            for finished in asyncio.as_completed(queries):
                try:
                    records = await finished
                except dns.resolver.NXDOMAIN:
                    continue  # the name vanished after the MX query: no address either
                except (dns.exception.DNSException, OSError) as exc:
                    failure = failure or exc
                    continue
                if records is not None:
                    return True
        finally:
            for query in queries:
                query.cancel()
            await asyncio.gather(*queries, return_exceptions=True)
        if failure is not None:
            # One family said "none", the other could not say: that is not a "no".
            raise failure
        return False

    async def _records(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> dns.rrset.RRset | None:
        """The answer's records, ``None`` for NOERROR without them; NXDOMAIN raises."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        answer = await self._resolver.resolve(
            name,
            rdtype,
            raise_on_no_answer=False,
            lifetime=remaining,
            search=False,
            backend=self._backend,
        )
        return answer.rrset


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, port = _split_host_port(text, default_port=53)
    ipaddress.ip_address(host)  # dnspython needs an address; a host name would need DNS itself
    return dns.nameserver.Do53Nameserver(host, port)
