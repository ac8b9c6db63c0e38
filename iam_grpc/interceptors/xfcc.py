"""Caller identity forwarded by a trusted proxy in ``x-forwarded-client-cert`` (XFCC).

A sidecar (Envoy, Istio) that terminates mesh mTLS in front of iam-grpc connects over loopback,
so the service never sees the caller's certificate; the proxy instead describes it in the XFCC
header (Envoy's ``forward_client_cert_details``). The header is believed only when the TCP peer is
one of ``callers.trusted_proxies``; from any other peer it is ignored, as if absent.

The header is a comma-separated list of elements, one per proxy hop, each a semicolon-separated
list of ``key=value`` pairs (keys ``By``, ``Hash``, ``Cert``, ``Chain``, ``Subject``, ``URI``,
``DNS``, any case); a value holding ``,``, ``;``, ``=`` or ``"`` is double-quoted, with ``\\"``
and ``\\\\`` escapes. With ``APPEND_FORWARD`` a proxy appends its element after whatever the
client sent, so only the **last** element, the one added by the proxy that connected to us, is
ours to trust; earlier elements may be written by anyone.

Refused (``CALLER_UNKNOWN``), never repaired, from a trusted peer: more than one XFCC header (a
proxy that appends to one of them while another comes last could be outvoted by the client's),
malformed quoting or pairs, control characters, oversized headers, a last element without a
single SPIFFE ``URI``, and a SPIFFE id no caller is configured with.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from iam_grpc.core.call import Caller

__all__ = [
    "XFCC_HEADER",
    "ForwardedCertificate",
    "MalformedXfcc",
    "TrustedProxies",
    "forwarded_caller",
    "parse_xfcc",
]

XFCC_HEADER = "x-forwarded-client-cert"
MAX_HEADER = 16 * 1024  # a few certificates' worth of URIs and hashes; Cert= PEMs are not needed
MAX_ELEMENTS = 32
_KEYS = frozenset({"by", "hash", "cert", "chain", "subject", "uri", "dns"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Metadata = Iterable[tuple[str, str | bytes]]


class MalformedXfcc(ValueError):
    """The header does not parse; the reason is for logs (it never echoes the value)."""


@dataclass(frozen=True, slots=True)
class ForwardedCertificate:
    """One XFCC element: what one proxy saw of its client's certificate (lower-case keys)."""

    pairs: tuple[tuple[str, str], ...]

    def values(self, field: str) -> list[str]:
        return [value for name, value in self.pairs if name == field]

    @property
    def spiffe_ids(self) -> list[str]:
        return [uri for uri in self.values("uri") if uri.startswith("spiffe://")]


class TrustedProxies:
    """The peers whose XFCC header is believed (``callers.trusted_proxies``; default none)."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, peer_ip: str | None) -> bool:
        if peer_ip is None or not self._networks:  # unix sockets have no address to trust
            return False
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self._networks)


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes; quotes and escapes are kept for _value."""
    parts: list[str] = []
    start, quoted, index = 0, False, 0
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    if quoted:
        raise MalformedXfcc("unterminated quoted value")
    parts.append(text[start:])
    return parts


def _value(raw: str) -> str:
    if not raw.startswith('"'):
        if '"' in raw or "\\" in raw:
            raise MalformedXfcc("a quote or backslash inside an unquoted value")
        return raw
    if len(raw) < 2 or not raw.endswith('"'):
        raise MalformedXfcc("text after a quoted value")
    out: list[str] = []
    body = raw[1:-1]
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            if index + 1 >= len(body) or body[index + 1] not in '"\\':
                raise MalformedXfcc("an unknown escape in a quoted value")
            out.append(body[index + 1])
            index += 2
            continue
        if char == '"':
            raise MalformedXfcc("text after a quoted value")
        out.append(char)
        index += 1
    return "".join(out)


def parse_xfcc(header: str) -> list[ForwardedCertificate]:
    """Every element of one XFCC header, in order (the last is the nearest proxy's)."""
    if len(header) > MAX_HEADER:
        raise MalformedXfcc("header too long")
    if not header.isprintable() or not header.isascii():
        raise MalformedXfcc("control or non-ASCII characters")
    elements = _split(header, ",")
    if len(elements) > MAX_ELEMENTS:
        raise MalformedXfcc("too many elements")
    parsed: list[ForwardedCertificate] = []
    for element in elements:
        pairs: list[tuple[str, str]] = []
        for pair in _split(element, ";"):
            key, equals, raw = pair.strip(" \t").partition("=")
            name = key.strip().lower()
            if not equals or name not in _KEYS:
                raise MalformedXfcc("a pair without a known key")
            pairs.append((name, _value(raw.strip(" \t"))))
        parsed.append(ForwardedCertificate(tuple(pairs)))
    return parsed


def _header_values(metadata: Metadata) -> list[str]:
    return [
        value.decode("latin-1") if isinstance(value, bytes) else str(value)
        for key, value in metadata
        if key.lower() == XFCC_HEADER
    ]


def forwarded_caller(
    metadata: Metadata,
    peer_ip: str | None,
    proxies: TrustedProxies,
    lookup: Callable[[str], Caller | None],
) -> Caller | None:
    """The caller a trusted proxy vouches for; None when the peer is not a trusted proxy or sent
    no XFCC (the other ways of identifying apply). Raises MalformedXfcc or LookupError (unknown
    SPIFFE id) when a trusted proxy's header names no configured caller."""
    if not proxies.trusts(peer_ip):
        return None
    values = _header_values(metadata)
    if not values:
        return None
    if len(values) > 1:
        raise MalformedXfcc("several headers")
    nearest = parse_xfcc(values[0])[-1]
    ids = nearest.spiffe_ids
    if len(ids) != 1:  # an X.509 SVID holds exactly one SPIFFE URI
        raise MalformedXfcc("the nearest element has no single SPIFFE URI")
    caller = lookup(ids[0])
    if caller is None:
        raise LookupError("unknown SPIFFE id")
    return caller
