"""`iam-grpc serve` as a process of its own, for tests that measure the service apart from their
clients (a client on the service's own event loop or GIL would be measured with it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

IAM = str(Path(sys.executable).parent / "iam-grpc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Served:
    address: str
    ops: str  # the ops HTTP listener, host:port

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """One sample of the Prometheus text on GET /metrics (0 when absent)."""
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in (labels or {}).items()) + "}" if labels else ""
        )
        with urllib.request.urlopen(f"http://{self.ops}/metrics", timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                key, _, value = line.rpartition(" ")
                if key == wanted:
                    return float(value)
        return 0.0


@contextlib.contextmanager
def serve(
    folder: Path, environ: Mapping[str, str], credentials: grpc.ChannelCredentials | None = None
) -> Iterator[Served]:
    """Start `iam-grpc serve` with ``environ`` on free ports; stop it with SIGTERM afterwards.
    ``credentials``: how the readiness probe connects to a TLS listener."""
    grpc_port, ops_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_DATA_DIR=str(folder / "var"),
        IAM_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        IAM_HTTP_LISTEN=f"127.0.0.1:{ops_port}",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        **environ,
    )
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([IAM, "serve"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"iam-grpc serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            channel = (
                grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
            )
            with contextlib.suppress(grpc.RpcError), channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            if time.monotonic() > deadline:
                pytest.fail("iam-grpc serve did not become SERVING")
            time.sleep(0.1)
        yield Served(address, f"127.0.0.1:{ops_port}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
