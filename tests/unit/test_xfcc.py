"""x-forwarded-client-cert from a trusted proxy (behaviour.md 2.8, security.md S20): parsing, the
nearest element, trusted peers, and the attacker's spellings."""

from __future__ import annotations

import ipaddress
import json

import pytest

from iam_grpc.config import ConfigError, load_settings
from iam_grpc.core.call import Caller
from iam_grpc.interceptors.callers import CallerRegistry
from iam_grpc.interceptors.xfcc import (
    MAX_HEADER,
    MalformedXfcc,
    TrustedProxies,
    forwarded_caller,
    parse_xfcc,
)

APP = "spiffe://cluster.local/ns/app/sa/frontend"
EVIL = "spiffe://cluster.local/ns/iam/sa/admin"
ISTIO = (
    "By=spiffe://cluster.local/ns/iam/sa/iam-grpc;Hash=2b4bcd1f6e5fa51b24b06ab97a1a8c47f4a8a8c1e1b5e4ab"
    'e7fd0e6cc2d4a83b;Subject="";URI=' + APP
)
PROXIES = TrustedProxies([ipaddress.ip_network("127.0.0.6/32"), ipaddress.ip_network("10.1.0.0/16")])


def registry(**extra: str) -> CallerRegistry:
    env = {
        "IAM_CALLERS__TRUSTED_PROXIES": '["127.0.0.6", "10.1.0.0/16"]',
        "IAM_CALLERS__FRONTEND__SPIFFE_IDS": json.dumps([APP]),
        "IAM_CALLERS__FRONTEND__METHODS": '["envoy.service.auth.v3.Authorization/Check"]',
        **extra,
    }
    return CallerRegistry(load_settings(environ=env).callers, embedded=False)


def identify(header: list[str] | str, peer: str | None = "127.0.0.6") -> Caller | None:
    callers = registry()
    values = [header] if isinstance(header, str) else header
    metadata = [("x-forwarded-client-cert", value) for value in values]
    return forwarded_caller(metadata, peer, callers.trusted_proxies, callers.by_spiffe_id)


def test_istio_header_names_the_configured_caller() -> None:
    """The element Istio's sidecar sets (By, Hash, empty quoted Subject, URI) maps its SPIFFE id."""
    caller = identify(ISTIO)
    assert caller is not None
    assert (caller.id, caller.via, caller.trust_client_ip) == ("frontend", "xfcc", False)
    assert caller.may_call("/envoy.service.auth.v3.Authorization/Check")
    assert not caller.may_call("/iam.v1.UserService/DeleteUser")


def test_the_nearest_proxys_element_is_the_last() -> None:
    """With APPEND_FORWARD the client's own element comes first; only the last one counts."""
    assert identify(f"URI={EVIL},{ISTIO}") is not None
    with pytest.raises(LookupError):
        identify(f"{ISTIO},URI={EVIL}")


def test_quoted_values_keep_separators_and_escapes() -> None:
    """Commas, semicolons, equals signs and escaped quotes inside quotes belong to the value."""
    [first, second] = parse_xfcc(
        'Subject="CN=a,O=b;c=\\"d\\"";URI=spiffe://x/y;DNS=a.example;DNS=b.example,By=spiffe://p/q'
    )
    assert first.values("subject") == ['CN=a,O=b;c="d"']
    assert first.values("dns") == ["a.example", "b.example"]
    assert first.spiffe_ids == ["spiffe://x/y"]
    assert second.values("by") == ["spiffe://p/q"]
    assert parse_xfcc('uri="spiffe://x/y"')[0].spiffe_ids == ["spiffe://x/y"]  # keys in any case


def test_from_an_untrusted_peer_the_header_is_ignored() -> None:
    """Not a trusted proxy (another address, a unix socket, no proxies configured): as if absent."""
    assert identify(ISTIO, "127.0.0.1") is None
    assert identify(ISTIO, "10.2.0.1") is None
    assert identify(ISTIO, None) is None
    assert identify('garbage"', "192.0.2.1") is None  # not even parsed
    nobody = registry(IAM_CALLERS__TRUSTED_PROXIES="[]")
    metadata = [("x-forwarded-client-cert", ISTIO)]
    assert forwarded_caller(metadata, "127.0.0.6", nobody.trusted_proxies, nobody.by_spiffe_id) is None


def test_trusted_peers_match_by_network_and_ipv4_mapped() -> None:
    """CIDRs and single addresses; IPv4-mapped IPv6 is its IPv4 address; garbage is untrusted."""
    assert PROXIES.trusts("10.1.200.3")
    assert PROXIES.trusts("::ffff:127.0.0.6")
    assert not PROXIES.trusts("127.0.0.7")
    assert not PROXIES.trusts("not-an-ip")
    assert not TrustedProxies([]).trusts("127.0.0.6")


def test_no_header_from_a_trusted_peer_leaves_the_other_ways() -> None:
    """A trusted proxy that forwards no certificate: the API key / loopback rules decide."""
    callers = registry()
    assert forwarded_caller([("x-iam-api-key", "k")], "127.0.0.6", PROXIES, callers.by_spiffe_id) is None


@pytest.mark.parametrize(
    "header",
    [
        "",  # empty
        "URI",  # no '='
        "Foo=bar;URI=" + APP,  # unknown key
        'URI="' + APP,  # unterminated quote
        'URI="' + APP + '"x',  # text after the quotes
        'URI=spiffe://x"y',  # a quote inside an unquoted value
        'Subject="a\\n";URI=' + APP,  # unknown escape
        "URI=" + APP + "\r\nx-iam-api-key: k",  # header injection
        "URI=" + APP + "\x00",  # NUL
        "URI=spiffe://cluster.local/ns/app/sa/fröntend",  # non-ASCII
        "URI=" + APP + ";URI=spiffe://cluster.local/ns/app/sa/other",  # two identities
        "By=spiffe://x/y;Hash=ab",  # no URI at all
        "URI=https://frontend.example",  # not a SPIFFE id
        ",".join(["By=spiffe://x/y"] * 40) + "," + ISTIO,  # too many hops
        "URI=" + APP + ";Hash=" + "a" * MAX_HEADER,  # too long
    ],
)
def test_malformed_headers_from_a_trusted_peer_are_refused(header: str) -> None:
    """Never repaired, never skipped over: CALLER_UNKNOWN (the interceptor maps MalformedXfcc)."""
    with pytest.raises(MalformedXfcc):
        identify(header)


def test_several_headers_are_refused() -> None:
    """Two XFCC headers (a client's and the proxy's) are ambiguous, whatever their order."""
    with pytest.raises(MalformedXfcc):
        identify([ISTIO, ISTIO])
    with pytest.raises(MalformedXfcc):
        identify([f"URI={EVIL}", ISTIO])


def test_an_unknown_spiffe_id_is_refused() -> None:
    """A well-formed header naming nobody configured is a refusal, not a fall-through."""
    with pytest.raises(LookupError):
        identify("URI=spiffe://cluster.local/ns/app/sa/unknown")
    with pytest.raises(LookupError):
        identify("URI=" + APP.upper().replace("SPIFFE://", "spiffe://"))  # ids match exactly


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"IAM_CALLERS__A__SPIFFE_IDS": '["https://x/y"]'}, "callers.a.spiffe_ids"),
        ({"IAM_CALLERS__A__SPIFFE_IDS": '["spiffe://x"]'}, "callers.a.spiffe_ids"),
        ({"IAM_CALLERS__A__SPIFFE_IDS": '["spiffe://X/y"]'}, "callers.a.spiffe_ids"),
        ({"IAM_CALLERS__TRUSTED_PROXIES": '["10.0.0.1/8"]'}, "callers.trusted_proxies"),
        ({"IAM_CALLERS__TRUSTED_PROXIES": '["proxy.local"]'}, "callers.trusted_proxies"),
    ],
)
def test_settings_are_validated(env: dict[str, str], problem: str) -> None:
    """SPIFFE ids follow spiffe://<lower-case trust domain>/<path>; proxies are addresses or CIDRs."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IAM_CALLERS__A__METHODS": '["*"]', **env})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_a_caller_may_be_known_by_spiffe_id_alone() -> None:
    """spiffe_ids is a credential of its own; the default trusts no proxy."""
    settings = load_settings(
        environ={"IAM_CALLERS__A__METHODS": '["*"]', "IAM_CALLERS__A__SPIFFE_IDS": json.dumps([APP])}
    )
    assert settings.callers.trusted_proxies == []
    assert settings.callers.entries["a"].spiffe_ids == [APP]
