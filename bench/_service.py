"""What the benchmarks share: an `iam-grpc serve` subprocess and a closed-loop load driver."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

IAM = str(Path(sys.executable).parent / "iam-grpc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(folder: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start `iam-grpc serve` on a free port with ``extra`` settings; return it once SERVING."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_DATA_DIR=str(folder),
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN="",
        IAM_LOG_LEVEL="WARNING",
        IAM_LOGGING__FILES="false",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        **extra,
    )
    process = subprocess.Popen(
        [IAM, "serve"], cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return process, port
        except grpc.RpcError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


async def throughput(call: Callable[[], Awaitable[Any]], seconds: float, concurrency: int) -> float:
    """Calls per second with ``concurrency`` calls always in flight."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await call()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - started)
