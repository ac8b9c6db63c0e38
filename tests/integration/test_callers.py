"""Caller authentication through the real server (behaviour.md 2.8, S62, S63)."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iam_grpc.clock import SystemClock
from iam_grpc.config import CallersSettings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.interceptors.callers import CallerAuthInterceptor, CallerRegistry
from iam_grpc.metrics import Metrics
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.storage.memory import MemoryEphemeral
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.testing import RunningService, error_details, running_service

BFF_KEYS = ("iamk_bff_" + "a" * 43, "iamk_bff_" + "b" * 43)
SVC_KEY = "iamk_svc_" + "c" * 43


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CALLERS = {
    "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps([digest(k) for k in BFF_KEYS]),
    "IAM_CALLERS__BFF__METHODS": '["iam.v1.AuthService/*", "iam.v1.TokenService/*", "iam.v1.MfaService/*"]',
    "IAM_CALLERS__BFF__TRUST_CLIENT_IP": "true",
    "IAM_CALLERS__SVC__API_KEY_SHA256": json.dumps([digest(SVC_KEY)]),
    "IAM_CALLERS__SVC__METHODS": '["iam.v1.TokenService/VerifyAccessToken", "iam.v1.TokenService/GetJwks"]',
}


def non_loopback_address() -> str:
    """A local address that is not loopback (the route to the outside), to be a non-loopback peer."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # UDP connect sends nothing; it only picks a source address
        address = str(probe.getsockname()[0])
    except OSError:
        address = ""
    finally:
        probe.close()
    if not address or address.startswith("127."):
        pytest.fail("this machine has no non-loopback IPv4 address to test a remote peer with", pytrace=False)
    return address


async def login_outcome(
    channel: grpc.aio.Channel, key: str | None = None
) -> tuple[grpc.StatusCode, str | None]:
    metadata = (("x-iam-api-key", key),) if key is not None else ()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth_pb2_grpc.AuthServiceStub(channel).Login(auth_pb2.LoginRequest(), metadata=metadata)
    details = error_details(caught.value)
    return details.code, details.reason


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    env = {**CALLERS, "IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK": "false"}
    async with running_service(tmp_path_factory.mktemp("callers"), env) as running:
        yield running


async def test_no_key_is_unauthenticated_caller_unknown(keyed: RunningService) -> None:
    """Without a credential (and loopback access switched off) a call is UNAUTHENTICATED CALLER_UNKNOWN."""
    async with keyed.channel() as channel:
        assert await login_outcome(channel) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


async def test_an_unknown_key_is_refused(keyed: RunningService) -> None:
    """A key whose digest is not configured is refused, whatever its shape."""
    async with keyed.channel() as channel:
        for key in ("iamk_bff_" + "z" * 43, "", "x" * 5000, digest(BFF_KEYS[0])):
            assert await login_outcome(channel, key) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


async def test_both_configured_keys_of_a_caller_work(keyed: RunningService) -> None:
    """A caller may have two keys (rotation); each passes authentication."""
    async with keyed.channel() as channel:
        for key in BFF_KEYS:
            assert await login_outcome(channel, key) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_caller_outside_its_methods_is_permission_denied(keyed: RunningService) -> None:
    """A resource service allowed only token verification cannot call Login."""
    async with keyed.channel() as channel:
        assert await login_outcome(channel, SVC_KEY) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_UNKNOWN")
        allowed = await token_pb2_grpc.TokenServiceStub(channel).GetJwks(
            token_pb2.GetJwksRequest(), metadata=(("x-iam-api-key", SVC_KEY),)
        )
        assert json.loads(allowed.jwks_json)["keys"]


async def test_health_needs_no_caller(keyed: RunningService) -> None:
    """Health checks are open to load balancers without a key."""
    async with keyed.channel() as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_denials_are_counted(keyed: RunningService) -> None:
    """Refused callers show up in the metrics."""
    counter = keyed.app.metrics.caller_denied.labels("unknown")
    before = counter._value.get()
    async with keyed.channel() as channel:
        await login_outcome(channel, "iamk_nope_" + "q" * 43)
    assert counter._value.get() == before + 1
    assert 'iam_caller_denied_total{reason="unknown"}' in keyed.app.metrics.render().decode()


async def test_loopback_callers_need_no_key_in_embedded_mode(tmp_path: Path) -> None:
    """By default embedded mode serves unauthenticated callers on loopback."""
    async with running_service(tmp_path) as running, running.channel() as channel:
        assert await login_outcome(channel) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_server_listening_beyond_loopback_needs_keys_even_from_loopback(tmp_path: Path) -> None:
    """Listening on 0.0.0.0, a loopback peer may be a proxy or sidecar for remote clients: no key, no entry."""
    env = {**CALLERS, "IAM_GRPC_LISTEN": "0.0.0.0:0"}
    async with running_service(tmp_path, env) as running, running.channel() as channel:
        assert await login_outcome(channel) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")
        assert await login_outcome(channel, BFF_KEYS[0]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )


async def test_remote_callers_need_a_key_even_in_embedded_mode(tmp_path: Path) -> None:
    """A peer that is not loopback gets CALLER_UNKNOWN without a key, and passes with one."""
    address = non_loopback_address()
    env = {**CALLERS, "IAM_GRPC_LISTEN": "0.0.0.0:0"}
    async with (
        running_service(tmp_path, env) as running,
        grpc.aio.insecure_channel(f"{address}:{running.app.grpc_port}") as channel,
    ):
        assert await login_outcome(channel) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")
        assert await login_outcome(channel, BFF_KEYS[1]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )


# mTLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | bytes]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(folder / "server.pem")
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(folder / "server.pem", append=True)
    server.private_key_pem.write_to_path(folder / "server.key")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    out: dict[str, Path | bytes] = {"dir": folder, "ca": ca.cert_pem.bytes()}
    for name, issuer, san in (
        ("bff", ca, "bff.internal"),
        ("stranger", ca, "stranger.internal"),
        ("foreign", other_ca, "bff.internal"),
    ):
        cert = issuer.issue_cert(san)
        out[f"{name}.key"] = cert.private_key_pem.bytes()
        out[f"{name}.crt"] = b"".join(p.bytes() for p in cert.cert_chain_pems)
    return out


def tls_env(pki: dict[str, Path | bytes], mutual: bool) -> dict[str, str]:
    folder = pki["dir"]
    assert isinstance(folder, Path)
    env = {
        "IAM_GRPC_LISTEN": "127.0.0.1:0",
        "IAM_SERVER__TLS__CERT_FILE": str(folder / "server.pem"),
        "IAM_SERVER__TLS__KEY_FILE": str(folder / "server.key"),
        "IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK": "false",
        "IAM_CALLERS__BFF__CERT_SANS": '["bff.internal"]',
        "IAM_CALLERS__BFF__METHODS": '["*"]',
    }
    if mutual:
        env["IAM_SERVER__TLS__CLIENT_CA_FILE"] = str(folder / "ca.pem")
    return env


def secure_channel(address: str, pki: dict[str, Path | bytes], client: str | None) -> grpc.aio.Channel:
    root = pki["ca"]
    assert isinstance(root, bytes)
    key = pki[f"{client}.key"] if client else None
    chain = pki[f"{client}.crt"] if client else None
    credentials = grpc.ssl_channel_credentials(root, key, chain)  # type: ignore[arg-type]
    return grpc.aio.secure_channel(
        address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),)
    )


async def test_tls_serves_with_a_server_certificate(pki: dict[str, Path | bytes], tmp_path: Path) -> None:
    """With server.tls set, clients that trust the CA connect; callers still authenticate by key."""
    env = {**tls_env(pki, mutual=False), **CALLERS}
    async with (
        running_service(tmp_path, env) as running,
        secure_channel(running.address, pki, None) as channel,
    ):
        assert await login_outcome(channel, BFF_KEYS[0]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert await login_outcome(channel) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


async def test_mtls_identifies_callers_by_certificate(pki: dict[str, Path | bytes], tmp_path: Path) -> None:
    """A certificate with a configured SAN is the caller; an unknown SAN is CALLER_UNKNOWN."""
    async with running_service(tmp_path, tls_env(pki, mutual=True)) as running:
        async with secure_channel(running.address, pki, "bff") as channel:
            assert await login_outcome(channel) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        async with secure_channel(running.address, pki, "stranger") as channel:
            assert await login_outcome(channel) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


@pytest.mark.parametrize("client", [None, "foreign"])
async def test_mtls_refuses_missing_or_foreign_certificates(
    pki: dict[str, Path | bytes], tmp_path: Path, client: str | None
) -> None:
    """No client certificate, or one from another CA, fails the handshake (while a valid one works)."""
    async with running_service(tmp_path, tls_env(pki, mutual=True)) as running:
        async with secure_channel(running.address, pki, "bff") as good:
            assert await login_outcome(good) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        async with secure_channel(running.address, pki, client) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await auth_pb2_grpc.AuthServiceStub(channel).Login(auth_pb2.LoginRequest(), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_denials_are_audited_at_most_once_a_minute_per_peer(keyed: RunningService) -> None:
    """caller.denied lands in the audit table, but repeated refusals of one peer do not multiply rows."""
    async with keyed.app.components.db.transaction() as tx:
        before = len(await tx.audit.recent(type_prefix="caller.denied", limit=1000))
    async with keyed.channel() as channel:
        for _ in range(5):
            await login_outcome(channel, SVC_KEY)  # svc may not call Login
    await keyed.app.components.audit.drain()
    async with keyed.app.components.db.transaction() as tx:
        events = await tx.audit.recent(type_prefix="caller.denied", limit=1000)
    method_denials = [e for e in events if e.details.get("reason") == "method"]
    assert len(events) - before <= 1
    assert len(method_denials) == 1
    assert method_denials[0].details["method"] == "/iam.v1.AuthService/Login"
    assert method_denials[0].ip == "127.0.0.1"


async def test_denial_audits_are_throttled_per_ipv6_64_not_per_address(database: SqlDatabase) -> None:
    """An IPv6 client rotating its addresses within its /64 is one peer for the caller.denied
    throttle (as for the ip limiters, behaviour.md 8.2): twenty refusals from twenty addresses of
    one /64 write one row, another /64 its own row, and IPv4 peers are still told apart."""
    site = secrets.randbelow(0xFFFF) + 1
    one, another = f"2001:db8:{site:x}:1", f"2001:db8:{site:x}:2"
    v4 = [f"192.0.2.{secrets.randbelow(100) + 1}", f"198.51.100.{secrets.randbelow(100) + 1}"]
    peers = [f"{one}::{i:x}" for i in range(1, 21)] + [f"{another}::1", f"{another}::2", *v4]
    clock = SystemClock()
    audit = AuditTrail(database, clock, SecretMaterial(secrets.token_bytes(32)))
    interceptor = CallerAuthInterceptor(
        CallerRegistry(CallersSettings(), embedded=False),
        Metrics(),
        audit=audit,
        ephemeral=MemoryEphemeral(max_keys=1000, clock=clock),
    )
    for peer in peers:
        await interceptor.record_denial("unknown", peer, None, "/iam.v1.AuthService/Login")
    await audit.drain()
    async with database.transaction(read_only=True) as tx:
        events = await tx.audit.recent(type_prefix="caller.denied", limit=10_000)
    audited = [e.ip for e in events if e.ip in peers]
    assert audited.count(f"{one}::1") == 1
    assert audited.count(f"{another}::1") == 1
    assert sorted(ip for ip in audited if ip in v4) == sorted(v4)
    assert len(audited) == 4
