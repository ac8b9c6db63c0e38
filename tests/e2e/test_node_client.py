"""The Node.js client (clients/node) against a real server.

The package and its tests are compiled as ``npm test`` does (``npm run pretest``) and run with
node's own test runner against ``iam-grpc serve`` started here; any failing node test fails the
pytest test, with node's output. ``make install`` runs ``npm ci`` there first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from tests.conftest import Backend
from tests.served import Served, serve

ROOT = Path(__file__).resolve().parents[2]
NODE_PACKAGE = ROOT / "clients" / "node"
API_KEY = "iamk_node_" + secrets.token_urlsafe(32)
LOGOUT_LIMIT = 5


def server_environ(algorithm: str) -> dict[str, str]:
    return {
        "IAM_TOKENS__ALGORITHM": algorithm,
        # A caller for the API-key test: known key, two methods only.
        "IAM_CALLERS__NODE__API_KEY_SHA256": json.dumps([hashlib.sha256(API_KEY.encode()).hexdigest()]),
        "IAM_CALLERS__NODE__METHODS": json.dumps(
            ["iam.v1.TokenService/GetJwks", "iam.v1.TokenService/VerifyAccessToken"]
        ),
        "IAM_RATELIMIT__GROUPS": json.dumps(
            {"logout.ip": {"windows": [f"{LOGOUT_LIMIT}/1h"], "max_strikes": 0}}
        ),
    }


@pytest.fixture(scope="module")
def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("node"), {**backend.isolated(), **server_environ("ES256")}) as served:
        yield served


@pytest.fixture(scope="module")
def compiled() -> Path:
    """The package and its tests compiled once (``npm run pretest``, as ``npm test`` does first)."""
    npm = shutil.which("npm")
    if npm is None or not (NODE_PACKAGE / "node_modules").is_dir():
        pytest.fail("clients/node is not installed: run `make install` (npm ci)", pytrace=False)
    result = subprocess.run(
        [npm, "run", "pretest"], cwd=NODE_PACKAGE, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(f"clients/node does not compile:\n{result.stdout}{result.stderr}", pytrace=False)
    return NODE_PACKAGE / "build" / "test"


def node_test(compiled: Path, served: Served, algorithm: str, *names: str, **extra: str) -> str:
    """``node --test`` on the compiled test files (``names``, or all of build/test but not its
    subfolders) against ``served``; ``extra`` goes into their environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_TEST_GRPC_ADDRESS=served.address,
        IAM_TEST_OPS_ADDRESS=served.ops,
        IAM_TEST_ALGORITHM=algorithm,
        IAM_TEST_API_KEY=API_KEY,
        IAM_TEST_LOGOUT_LIMIT=str(LOGOUT_LIMIT),
    )
    files = [compiled / f"{name}.test.js" for name in names] or sorted(compiled.glob("*.test.js"))
    env.update(extra)
    command = [shutil.which("node") or "node", "--test", "--test-reporter=spec", *map(str, files)]
    result = subprocess.run(command, cwd=NODE_PACKAGE, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"node tests failed (exit {result.returncode}):\n{output[-20000:]}", pytrace=False)
    return output


def counts(output: str) -> dict[str, int]:
    """node's closing summary (``ℹ pass 14`` with the spec reporter, ``# pass 14`` with TAP)."""
    return {
        name: int(number)
        for name, number in re.findall(
            r"^\S*\s*(tests|pass|fail|skipped|todo|cancelled) (\d+)$", output, re.M
        )
    }


def test_node_client_against_a_real_server(iam: Served, compiled: Path) -> None:
    """Typed client (signup, login, refresh, verify), error decoder (field violations,
    INVALID_CREDENTIALS, RATE_LIMITED with RetryInfo) and local verifier (real, tampered,
    expired and revoked tokens) in clients/node/test/*.test.ts."""
    output = node_test(compiled, iam, "ES256")
    summary = counts(output)
    assert summary.get("fail") == 0, output
    assert summary.get("pass", 0) >= 14, output
    assert summary.get("skipped", 0) == 0, output
    assert summary.get("todo", 0) == 0, output
    for name in ["signup, login, refresh and verify", "RATE_LIMITED carries RetryInfo", "a revoked token"]:
        assert name in output, output


def test_node_verifier_with_eddsa_keys(tmp_path: Path, compiled: Path) -> None:
    """The verifier's tests again with a server that signs EdDSA (Ed25519 on Node's WebCrypto).
    The algorithm is not a storage matter: one embedded server, its own data directory (switching
    the shared test database to EdDSA would publish an Ed25519 key to every later test)."""
    with serve(tmp_path, server_environ("EdDSA")) as served:
        output = node_test(compiled, served, "EdDSA", "verifier")
    summary = counts(output)
    assert summary.get("fail") == 0, output
    assert summary.get("pass", 0) >= 6, output


def test_node_client_over_mtls(tmp_path: Path, compiled: Path) -> None:
    """``tls: {ca, cert, key}``: a server that requires client certificates identifies the Node
    client's caller by the certificate; no certificate, an untrusted server or plaintext fail."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client = ca.issue_cert("node.internal")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    environ = {
        "IAM_SERVER__TLS__CERT_FILE": str(tmp_path / "server.pem"),
        "IAM_SERVER__TLS__KEY_FILE": str(tmp_path / "server.pem"),
        "IAM_SERVER__TLS__CLIENT_CA_FILE": str(tmp_path / "ca.pem"),
        "IAM_CALLERS__NODE__CERT_SANS": '["node.internal"]',
        "IAM_CALLERS__NODE__METHODS": '["iam.v1.TokenService/GetJwks"]',
    }
    probe = grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(), client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()
    )
    with serve(tmp_path / "server", environ, probe) as served:
        output = node_test(
            compiled,
            served,
            "ES256",
            "tls/mtls",
            IAM_TEST_TLS_ADDRESS=served.address,
            IAM_TEST_TLS_CA=str(tmp_path / "ca.pem"),
            IAM_TEST_TLS_CERT=str(tmp_path / "client.pem"),
            IAM_TEST_TLS_KEY=str(tmp_path / "client.key"),
        )
    summary = counts(output)
    assert summary.get("fail") == 0, output
    assert summary.get("pass") == 2, output


EXAMPLE_PROTO = """syntax = "proto3";

package iam.v1;

// A service that is not part of the contract.
service ExampleService {
  // Looks something up.
  rpc LookUp(LookUpRequest) returns (LookUpResponse);
}

// LookUp input.
message LookUpRequest {
  // The user's access token.
  string access_token = 1;
}

// LookUp result.
message LookUpResponse {
  // The user's identifier.
  string user_id = 1;
}
"""

PROBE = """import { createIamClient, services, type LookUpResponse } from "./index.js";

const iam = createIamClient({ address: "127.0.0.1:1" });
const answer: Promise<LookUpResponse> = iam.example.lookUp({ accessToken: "x" });
const name: string = services.ExampleService.typeName;
// @ts-expect-error: lookUp takes a LookUpRequest, whose field is accessToken
iam.example.lookUp({ token: "x" });
export { answer, name };
"""


def test_a_service_added_to_the_protos_is_a_typed_client_after_regeneration(tmp_path: Path) -> None:
    """`make proto`'s TypeScript step on a copy of protos/ with a new service: the generated index
    lists it and the package's own sources type-check a call through ``iam.example`` (and refuse a
    wrong field: the ``@ts-expect-error`` line fails the check if ``iam.example`` were untyped)."""
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    (protos / "iam" / "v1" / "example.proto").write_text(EXAMPLE_PROTO)
    package = tmp_path / "node"
    shutil.copytree(NODE_PACKAGE / "src", package / "src", ignore=shutil.ignore_patterns("gen"))
    shutil.copy(NODE_PACKAGE / "tsconfig.json", package)
    (package / "node_modules").symlink_to(NODE_PACKAGE / "node_modules")
    gen_proto.generate_typescript(package / "src" / "gen", protos)
    index = (package / "src" / "gen" / "index.ts").read_text()
    assert 'export * from "./iam/v1/example_pb.js";' in index
    assert "  ExampleService,\n" in index
    (package / "src" / "probe.ts").write_text(PROBE)
    tsc = subprocess.run(
        [str(NODE_PACKAGE / "node_modules" / ".bin" / "tsc"), "--noEmit", "-p", str(package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr
