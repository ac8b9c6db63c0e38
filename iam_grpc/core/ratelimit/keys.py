"""Raw limiter keys by kind (behaviour.md 8.2). The stored key is a keyed hash
of group + raw key, so addresses and IPs are not readable in the store and
case, Unicode or address-form variants of one identity share a key."""

from __future__ import annotations

import ipaddress
import unicodedata

__all__ = ["email_key", "ip_key", "pair_key", "parse_ip"]


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, with IPv4-mapped IPv6 turned into IPv4; None when it does not parse.

    An IPv6 zone (``fe80::1%eth0``) is refused: it names an interface of the sender's host, means
    nothing here, and would make the stored form of any address as long as the caller likes."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_key(ip: str) -> str:
    """IPv4 as is; IPv6 as its /64 (one subscriber's prefix)."""
    address = parse_ip(ip)
    if address is None:
        return ip.strip()
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def email_key(email: str) -> str:
    """The normalised address: NFKC, trimmed, lowercased."""
    return unicodedata.normalize("NFKC", email).strip().lower()


def pair_key(ip: str, email: str) -> str:
    return f"{ip_key(ip)}|{email_key(email)}"
