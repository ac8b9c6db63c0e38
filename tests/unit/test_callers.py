"""Caller registry: who is calling and what may they call (behaviour.md 2.8)."""

from __future__ import annotations

import hashlib
import json

from iam_grpc.config import load_settings
from iam_grpc.core.call import Caller
from iam_grpc.interceptors.callers import CallerRegistry
from iam_grpc.interceptors.context import parse_peer


def registry(embedded: bool = True, listening_on_loopback: bool = True, **extra: str) -> CallerRegistry:
    env = {
        "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps(
            [hashlib.sha256(b"key-one").hexdigest(), hashlib.sha256(b"key-two").hexdigest()]
        ),
        "IAM_CALLERS__BFF__METHODS": '["iam.v1.AuthService/*"]',
        "IAM_CALLERS__MESH__CERT_SANS": '["spiffe://cluster/ns/app/sa/envoy"]',
        "IAM_CALLERS__MESH__METHODS": '["envoy.service.auth.v3.Authorization/Check"]',
        **extra,
    }
    return CallerRegistry(
        load_settings(environ=env).callers, embedded=embedded, listening_on_loopback=listening_on_loopback
    )


def test_api_keys_are_matched_by_digest() -> None:
    """Either configured key identifies the caller; anything else is unknown."""
    callers = registry()
    first, second = callers.by_api_key("key-one"), callers.by_api_key("key-two")
    assert first is not None
    assert second is not None
    assert (first.id, second.id) == ("bff", "bff")
    assert callers.by_api_key("key-three") is None
    assert callers.by_api_key(hashlib.sha256(b"key-one").hexdigest()) is None


def test_certificates_are_matched_by_subject_alternative_name() -> None:
    """An mTLS identity maps to its caller."""
    caller = registry().by_certificate(["other", "spiffe://cluster/ns/app/sa/envoy"])
    assert caller is not None
    assert (caller.id, caller.via) == ("mesh", "mtls")
    assert registry().by_certificate(["unknown"]) is None


def test_unauthenticated_access_only_from_loopback_in_embedded_mode() -> None:
    """Loopback (IPv4, IPv6, unix socket) passes in embedded mode; other peers and production do not."""
    embedded = registry()
    assert embedded.anonymous("127.0.0.1", False) is not None
    assert embedded.anonymous("::1", False) is not None
    assert embedded.anonymous(None, True) is not None
    assert embedded.anonymous("192.0.2.7", False) is None
    assert embedded.anonymous(None, False) is None
    assert registry(embedded=False).anonymous("127.0.0.1", False) is None
    assert registry(IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK="false").anonymous("127.0.0.1", False) is None


def test_allow_unauthenticated_lets_anyone_in() -> None:
    """The explicit opt-out admits any peer."""
    assert (
        registry(embedded=False, IAM_CALLERS__ALLOW_UNAUTHENTICATED="true").anonymous("203.0.113.9", False)
        is not None
    )


def test_method_rules_match_full_names_and_service_wildcards() -> None:
    """'*', 'pkg.Service/*' and 'pkg.Service/Method' rules."""
    caller = Caller("svc", ("iam.v1.TokenService/VerifyAccessToken", "iam.v1.MfaService/*"), False, "api_key")
    assert caller.may_call("/iam.v1.TokenService/VerifyAccessToken")
    assert caller.may_call("/iam.v1.MfaService/StartStepUp")
    assert not caller.may_call("/iam.v1.TokenService/Refresh")
    assert not caller.may_call("/iam.v1.AuthService/Login")
    assert Caller("all", ("*",), False, "api_key").may_call("/anything.Service/Method")


def test_peer_strings_are_parsed_to_ips() -> None:
    """grpc peer strings give the client IP; IPv4-mapped IPv6 becomes IPv4; unix sockets give none."""
    assert parse_peer("ipv4:192.0.2.1:5555") == "192.0.2.1"
    assert parse_peer("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert parse_peer("ipv6:[::ffff:192.0.2.1]:443") == "192.0.2.1"
    assert parse_peer("unix:/tmp/sock") is None
    assert parse_peer("garbage") is None
