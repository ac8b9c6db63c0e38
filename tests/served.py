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


class ServedProcess:
    """One `iam-grpc serve` process on ports of its own, which a test can kill and start again on
    the same ports (a replica that crashed and was restarted)."""

    def __init__(
        self,
        folder: Path,
        environ: Mapping[str, str],
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.folder = folder
        self.credentials = credentials  # how the readiness probe connects to a TLS listener
        self.grpc_port, self.ops_port = free_port(), free_port()
        self.environ = dict(environ)
        self.process: subprocess.Popen[bytes] | None = None
        self.served = Served(f"127.0.0.1:{self.grpc_port}", f"127.0.0.1:{self.ops_port}")

    def start(self) -> Served:
        """Launch, and return once health says SERVING."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
        env.update(
            IAM_DATA_DIR=str(self.folder / "var"),
            IAM_GRPC_LISTEN=f"127.0.0.1:{self.grpc_port}",
            IAM_HTTP_LISTEN=f"127.0.0.1:{self.ops_port}",
            IAM_SHUTDOWN__DRAIN_DELAY="0",
            **self.environ,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "serve.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [IAM, "serve"], cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"iam-grpc serve exited with {self.process.returncode}:\n{log.read_text()[-4000:]}"
                )
            address = self.served.address
            channel = (
                grpc.secure_channel(address, self.credentials)
                if self.credentials
                else grpc.insecure_channel(address)
            )
            with contextlib.suppress(grpc.RpcError), channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return self.served
            if time.monotonic() > deadline:
                pytest.fail("iam-grpc serve did not become SERVING")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no drain, nothing flushed (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait for the drain; SIGKILL after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@contextlib.contextmanager
def serve(
    folder: Path, environ: Mapping[str, str], credentials: grpc.ChannelCredentials | None = None
) -> Iterator[Served]:
    """Start `iam-grpc serve` with ``environ`` on free ports; stop it with SIGTERM afterwards.
    ``credentials``: how the readiness probe connects to a TLS listener."""
    served = ServedProcess(folder, environ, credentials)
    try:
        yield served.start()
    finally:
        served.stop()
