"""Which email domains we take at signup and email change (behaviour.md 2.3 step 4,
2.7 step 3).

A domain is rejected when it is on ``deny_domains``, when it is disposable (on
the ``disposable-email-domains`` blocklist while ``email_checks.disposable`` is
on, and not on ``allow_domains``), or when DNS says it receives no mail. Every
list matches the domain itself and its subdomains, so ``x.mailinator.com`` is as
disposable as ``mailinator.com``. Names are compared lower-case in IDNA ASCII
form (``xn--...``), the form input validation hands us.

DNS is asked through :class:`MailDomainLookupPort`; an unknown answer (timeout,
resolver failure) lets the address through, because a DNS outage must not close
signup.

The blocklist (about 10,000 names) is loaded once, when this module is imported,
so startup pays for it rather than the first signup: about 3 ms and 1.5 MiB of
memory from cached bytecode (about 35 ms more the one time the source compiles).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator, Set
from typing import Protocol

from disposable_email_domains import blocklist

from iam_grpc.errors import EmailDomainRejected

__all__ = ["EmailDomainPolicy", "MailDomainLookupPort"]

_DISPOSABLE: Set[str] = blocklist
_ASCII_DOMAIN = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


class MailDomainLookupPort(Protocol):
    async def accepts_mail(self, domain: str) -> bool | None:
        """``True``/``False`` when DNS says whether ``domain`` receives mail, ``None`` when it
        could not say."""
        ...


class EmailDomainPolicy:
    """The domain rules, built once from ``email_checks`` settings.

    ``mail_lookup`` is ``None`` when ``email_checks.check_mx`` is off (the embedded
    default): the lists still apply, DNS is not asked.
    """

    def __init__(
        self,
        *,
        disposable: bool,
        allow_domains: Iterable[str] = (),
        deny_domains: Iterable[str] = (),
        mail_lookup: MailDomainLookupPort | None = None,
    ) -> None:
        self._disposable = disposable
        self._allow = frozenset(_configured(entry, "allow_domains") for entry in allow_domains)
        self._deny = frozenset(_configured(entry, "deny_domains") for entry in deny_domains)
        self._mail_lookup = mail_lookup

    def is_disposable(self, domain: str) -> bool:
        """On the blocklist (itself or a parent) while the check is on, and not allowed."""
        if not self._disposable:
            return False
        suffixes = list(_suffixes(domain))
        return not self._allow.intersection(suffixes) and not _DISPOSABLE.isdisjoint(suffixes)

    async def check(self, domain: str) -> None:
        """Raise :class:`EmailDomainRejected` unless the domain passes every rule.

        behaviour.md starts both checks together so that neither waits for the other:
        the lookup task exists before the lists are read. The lists are in memory and
        decide before that task first runs, so a list rejection answers at once and
        cancels the lookup before it sends anything; a domain the lists accept waits
        for DNS alone.
        """
        lookup = (
            asyncio.create_task(self._mail_lookup.accepts_mail(_canonical(domain)))
            if self._mail_lookup is not None
            else None
        )
        try:
            if self._denied(domain) or self.is_disposable(domain):
                raise EmailDomainRejected()
            if lookup is not None and await lookup is False:
                raise EmailDomainRejected()
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
                # Let it close its sockets before we answer; its outcome no longer matters.
                await asyncio.gather(lookup, return_exceptions=True)

    def _denied(self, domain: str) -> bool:
        return not self._deny.isdisjoint(_suffixes(domain))


def _canonical(domain: str) -> str:
    return domain.rstrip(".").lower()


def _suffixes(domain: str) -> Iterator[str]:
    """``a.b.example`` -> ``a.b.example``, ``b.example``, ``example``."""
    name = _canonical(domain)
    while name:
        yield name
        _, _, name = name.partition(".")


def _configured(entry: str, setting: str) -> str:
    """Validate a list entry once, at startup: a typo here would silently match nothing."""
    name = _canonical(entry.strip())
    if not _ASCII_DOMAIN.fullmatch(name):
        raise ValueError(
            f"email_checks.{setting}: {entry!r} is not a domain in IDNA ASCII form "
            "(write xn--... for non-ASCII names; subdomains match without wildcards)"
        )
    return name
