"""`iam-grpc health` follows the server's own settings (listen address, TLS, mTLS), so a container
health check or a Kubernetes exec probe needs no address of its own: a real server, the command as
a real process given the same environment."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme
from grpc_health.v1 import health_pb2

from iam_grpc.testing import running_service
from tests.served import free_port

IAM = str(Path(sys.executable).parent / "iam-grpc")


async def health(environ: Mapping[str, str], *args: str, cwd: Path) -> tuple[int, str, str]:
    """Run `iam-grpc health` without blocking the loop the server runs on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(environ)
    process = await asyncio.create_subprocess_exec(
        IAM,
        "health",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode().strip()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server certificate issued by an intermediate CA (the chain file holds leaf + intermediate),
    a client certificate from the same root, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    root = trustme.CA()
    intermediate = root.create_child_ca()
    server = intermediate.issue_cert("iam.example.internal")
    server.private_key_pem.write_to_path(folder / "server.key")
    (folder / "server.pem").write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    assert len(server.cert_chain_pems) == 2  # leaf + intermediate
    root.cert_pem.write_to_path(folder / "ca.pem")
    client = intermediate.issue_cert("probe.internal")
    client.private_key_pem.write_to_path(folder / "probe.key")
    (folder / "probe.pem").write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    trustme.CA().cert_pem.write_to_path(folder / "other-ca.pem")
    return {name: folder / f"{name}.pem" for name in ("server", "ca", "probe", "other-ca")} | {
        "server.key": folder / "server.key",
        "probe.key": folder / "probe.key",
    }


def tls_env(pki: dict[str, Path], port: int, *, mutual: bool = False) -> dict[str, str]:
    env = {
        "IAM_GRPC_LISTEN": f"127.0.0.1:{port}",
        "IAM_SERVER__TLS__CERT_FILE": str(pki["server"]),
        "IAM_SERVER__TLS__KEY_FILE": str(pki["server.key"]),
    }
    if mutual:
        env["IAM_SERVER__TLS__CLIENT_CA_FILE"] = str(pki["ca"])
    return env


async def test_plaintext_on_a_wildcard_listen_address_is_probed_on_loopback(tmp_path: Path) -> None:
    """IAM_GRPC_LISTEN=0.0.0.0:<port> (the container's setting): the command dials 127.0.0.1:<port>."""
    port = free_port()
    env = {"IAM_GRPC_LISTEN": f"0.0.0.0:{port}"}
    async with running_service(tmp_path / "data", env):
        assert await health(env, cwd=tmp_path) == (0, "SERVING", "")
    code, _, err = await health(env, "--timeout", "0.5", cwd=tmp_path)
    assert code == 1
    assert "UNAVAILABLE" in err


async def test_not_serving_exits_1(tmp_path: Path) -> None:
    """The server answers, but NOT_SERVING (draining, or its stores failing): exit 1."""
    port = free_port()
    env = {"IAM_GRPC_LISTEN": f"127.0.0.1:{port}"}
    async with running_service(tmp_path / "data", env) as running:
        await running.app.readiness.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await health(env, cwd=tmp_path) == (1, "NOT_SERVING", "")


async def test_tls_is_followed_and_the_served_certificate_is_trusted(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    """server.tls set: the command speaks TLS to the configured port, trusting the configured
    certificate chain and checking the certificate's own name; plaintext to that port fails."""
    port = free_port()
    env = tls_env(pki, port)
    async with running_service(tmp_path / "data", env):
        assert await health(env, cwd=tmp_path) == (0, "SERVING", "")
        # an explicit CA works too; the name still comes from the configured certificate
        assert await health(env, "--ca-file", str(pki["ca"]), cwd=tmp_path) == (0, "SERVING", "")
        # verification is real: a CA that did not sign the certificate fails, as does a wrong name
        wrong_ca = await health(env, "--ca-file", str(pki["other-ca"]), "--timeout", "1", cwd=tmp_path)
        assert wrong_ca[0] == 1
        wrong_name = await health(env, "--server-name", "other.example", "--timeout", "1", cwd=tmp_path)
        assert wrong_name[0] == 1
        # the old fixed plaintext probe of the same port does not get an answer
        plaintext = await health({}, "--address", f"127.0.0.1:{port}", "--timeout", "1", cwd=tmp_path)
        assert plaintext[0] == 1


async def test_mtls_needs_a_probe_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    """server.tls.client_ca_file set: without a client certificate the command says what it needs
    (exit 2); with one signed by the client CA it gets SERVING."""
    port = free_port()
    env = tls_env(pki, port, mutual=True)
    async with running_service(tmp_path / "data", env):
        code, out, err = await health(env, cwd=tmp_path)
        assert (code, out) == (2, "")
        assert "--cert-file" in err
        answer = await health(
            env, "--cert-file", str(pki["probe"]), "--key-file", str(pki["probe.key"]), cwd=tmp_path
        )
        assert answer == (0, "SERVING", "")
