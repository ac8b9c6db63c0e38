"""Cold start to SERVING and idle memory of `iam-grpc serve` (embedded mode).

Usage: python bench/startup.py [--runs N]

Each run starts `iam-grpc serve` in a new empty directory (so migrations, the
generated secrets and the first signing key are all part of the time), polls
gRPC health every 10 ms until SERVING, then waits 5 s idle and reads VmRSS
from /proc. A second start on the same directory gives the warm figures (no
migration to run, so Alembic is never imported).
Prints a JSON summary (medians) for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

IAM = str(Path(sys.executable).parent / "iam-grpc")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_once(folder: Path, idle: float) -> tuple[float, float | None]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN=f"127.0.0.1:{free_port()}",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [IAM, "serve"], cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=0.2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError("server exited")
                time.sleep(0.01)
        to_serving = time.perf_counter() - started
        rss = None
        if idle > 0:
            time.sleep(idle)
            rss = rss_mb(process.pid)
        return to_serving, rss
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cold, warm, cold_rss, warm_rss = [], [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, memory = start_once(Path(tmp), idle=5.0)
            cold.append(seconds)
            cold_rss.append(memory or 0.0)
            seconds, memory = start_once(Path(tmp), idle=5.0)
            warm.append(seconds)
            warm_rss.append(memory or 0.0)
    print(
        json.dumps(
            {
                "runs": args.runs,
                "cold_start_to_serving_s": round(statistics.median(cold), 3),
                "cold_start_max_s": round(max(cold), 3),
                "warm_start_to_serving_s": round(statistics.median(warm), 3),
                "idle_rss_mb_after_cold_start": round(statistics.median(cold_rss), 1),
                "idle_rss_mb_after_warm_start": round(statistics.median(warm_rss), 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
