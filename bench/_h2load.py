"""What the transport benchmarks share: gRPC frames for h2load, one h2load run with its own CPU,
the CPU of server processes and of the whole machine, and the service's /metrics counters.

h2load (Debian package ``nghttp2-client``) sends the same request body on every stream, so the
gRPC request is written once to a file: a 5-byte prefix (compressed flag 0, big-endian length)
and the serialised message.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

TICK = os.sysconf("SC_CLK_TCK")
INSTALL_HINT = "h2load is missing: install it with `apt-get install -y nghttp2-client` (Debian/Ubuntu)"


def h2load_path() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise SystemExit(INSTALL_HINT)
    return found


def grpc_frame(message: Message) -> bytes:
    """One uncompressed gRPC message as it travels in DATA frames."""
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


# --- CPU -----------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread (the event loop), from /proc/PID/task/PID. Python
    does not name its threads for the OS, so the argon2 pool and grpc's poller are "the rest"."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """Direct children of a process (pre-forked workers of ``iam-grpc serve``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found.extend(int(p) for p in task.read_text().split())
    return found


def tree(pid: int) -> list[int]:
    """A process and its direct children."""
    return [pid, *children(pid)]


def store_pids() -> list[int]:
    """MariaDB's and the shared Redis's processes (their CPU also serves other helpers' tests)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm == "mariadbd" or (
                comm == "redis-server" and b":6379" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def machine_busy() -> float:
    """CPU seconds every core has spent not idle since boot (/proc/stat, first line)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / TICK


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- /metrics ------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample of one process's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def summed(
    samples: Iterable[dict[tuple[str, tuple[tuple[str, str], ...]], float]],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The sum of several workers' scrapes."""
    total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for one in samples:
        for key, value in one.items():
            total[key] = total.get(key, 0.0) + value
    return total


def delta(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float:
    """How much the samples named ``name`` whose labels include ``labels`` grew."""
    grown = 0.0
    for key, value in after.items():
        if key[0] != name:
            continue
        have = dict(key[1])
        if all(have.get(k) == v for k, v in labels.items()):
            grown += value - before.get(key, 0.0)
    return grown


def by_label(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    label: str,
    **labels: str,
) -> dict[str, float]:
    """The growth of ``name`` split by one label (e.g. iam_rpc_total by code), zeros left out."""
    out: dict[str, float] = {}
    for key, value in after.items():
        have = dict(key[1])
        if key[0] != name or not all(have.get(k) == v for k, v in labels.items()):
            continue
        grown = value - before.get(key, 0.0)
        if grown:
            out[have.get(label, "")] = out.get(have.get(label, ""), 0.0) + grown
    return out


# --- h2load ----------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One h2load run and what the machine did meanwhile."""

    seconds: float  # h2load's measured duration
    requests_per_s: float  # h2load: finished streams with HTTP 2xx per second
    done: int
    http_ok: int
    failed: int
    data_bytes: int  # DATA payload received: answers with a body (gRPC errors have none)
    loader_cpu: float  # h2load's user + system CPU seconds
    wall: float  # h2load's wall time (process start to exit)
    server_cpu: float = 0.0  # CPU seconds of the server processes over the same wall time
    store_cpu: float = 0.0  # CPU seconds of MariaDB and the shared Redis, same wall time
    machine_cpu: float = 0.0  # CPU seconds of every process on the machine, same wall time
    load_before: float = 0.0
    load_after: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def others_cores(self) -> float:
        """Cores used by processes that are neither the server, the loader nor the stores."""
        return max(0.0, (self.machine_cpu - self.server_cpu - self.loader_cpu - self.store_cpu) / self.wall)


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) data")


def h2load(
    url: str,
    body: bytes,
    *,
    headers: Iterable[str] = (),
    seconds: float = 10.0,
    connections: int = 8,
    streams: int = 16,
    requests: int | None = None,
    server_pids: Iterable[int] = (),
) -> LoadResult:
    """Run h2load against one gRPC method (POST, h2c prior knowledge) and measure its own CPU,
    the server's CPU and the machine's over the same interval."""
    with tempfile.NamedTemporaryFile(suffix=".grpc") as data:
        data.write(body)
        data.flush()
        command = [
            h2load_path(),
            "-c",
            str(connections),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            data.name,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            *(arg for header in headers for arg in ("-H", header)),
        ]
        command += ["-n", str(requests)] if requests is not None else ["-D", f"{round(seconds * 1000)}ms"]
        command.append(url)
        pids = list(server_pids)
        stores = store_pids()
        server_before = sum(process_cpu(p) for p in pids)
        store_before = sum(process_cpu(p) for p in stores)
        machine_before = machine_busy()
        load_before = load_average()
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        output = process.stdout.read().decode()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        server_cpu = sum(process_cpu(p) for p in pids) - server_before
        store_cpu = sum(process_cpu(p) for p in stores) - store_before
        machine_cpu = machine_busy() - machine_before
    if process.returncode != 0:
        raise RuntimeError(f"h2load failed ({process.returncode}):\n{output}")
    finished = _FINISHED.search(output)
    counts = _REQUESTS.search(output)
    traffic = _TRAFFIC.search(output)
    if finished is None or counts is None or traffic is None:
        raise RuntimeError(f"cannot read h2load's output:\n{output}")
    return LoadResult(
        seconds=float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1),
        requests_per_s=float(finished.group(3)),
        done=int(counts.group(3)),
        http_ok=int(counts.group(4)),
        failed=int(counts.group(5)) + int(counts.group(6)),
        data_bytes=int(traffic.group(1)),
        loader_cpu=usage.ru_utime + usage.ru_stime,
        wall=wall,
        server_cpu=server_cpu,
        store_cpu=store_cpu,
        machine_cpu=machine_cpu,
        load_before=load_before,
        load_after=load_average(),
    )
