"""`server.workers > 1`: pre-forked workers on one port (behaviour.md 11.4), as operators run them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from iam_grpc.proto import token_pb2, token_pb2_grpc
from tests.e2e.test_cli import IAM, production_env, stop, wait_serving


def two_free_ports() -> int:
    """A port p with p + 1 free too (worker k listens for HTTP on p + k - 1)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                with socket.socket() as second:
                    second.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return int(answer.status)
    except OSError:
        return 0


def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def workers(tmp_path: Path, fresh_mysql: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`iam-grpc serve --migrate` with two workers, in a session of its own (like a terminal's job)."""
    grpc_port, http_port = two_free_ports(), two_free_ports()
    env = {
        **production_env(fresh_mysql, grpc_port),
        "IAM_SERVER__WORKERS": "2",
        "IAM_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }
    process = subprocess.Popen(
        [IAM, "serve", "--migrate"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned: set[int] = set()
    try:
        wait_serving(grpc_port, process, seconds=40)
        wait_for(lambda: healthz(http_port) == 200 and healthz(http_port + 1) == 200)
        spawned = children(process.pid)
        yield process, grpc_port, http_port
    finally:
        spawned |= children(process.pid)
        stop(process)
        for pid in spawned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_share_one_port_restart_when_killed_and_stop_on_sigterm(
    workers: tuple[subprocess.Popen[str], int, int],
) -> None:
    """Two workers serve one port (one signing key, made once by the parent); a killed worker is
    started again; SIGTERM stops every worker and the parent exits 0."""
    process, grpc_port, http_port = workers
    started = children(process.pid)
    assert len(started) == 2
    documents = set()
    for _ in range(8):  # separate connections, spread over the workers by the kernel
        with grpc.insecure_channel(
            f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            answer = token_pb2_grpc.TokenServiceStub(channel).GetJwks(token_pb2.GetJwksRequest(), timeout=5)
            documents.add(answer.jwks_json)
    assert len(documents) == 1
    assert len(json.loads(documents.pop())["keys"]) == 1

    victim = min(started)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(process.pid) - {victim}) == 2)
    wait_for(lambda: healthz(http_port) == 200 and healthz(http_port + 1) == 200)

    survivors = children(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not [pid for pid in survivors if Path(f"/proc/{pid}").exists()]  # reaped, none left behind


def test_ctrl_c_on_the_whole_process_group_still_drains_cleanly(
    workers: tuple[subprocess.Popen[str], int, int],
) -> None:
    """A terminal signals every process of the job; workers hear the parent only, so they drain
    (a second signal would mean "exit now") and everything exits 0."""
    process, _, _ = workers
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) == 0
    assert process.stdout is not None
    output = process.stdout.read()
    assert "second signal" not in output
    assert '"exit_codes":{"1":0,"2":0}' in output


def test_workers_whose_parent_is_killed_stop_on_their_own(
    workers: tuple[subprocess.Popen[str], int, int],
) -> None:
    """No orphan keeps serving unsupervised after its parent was SIGKILLed."""
    process, grpc_port, _ = workers
    orphans = children(process.pid)
    process.kill()
    process.wait(10)
    wait_for(lambda: not [pid for pid in orphans if Path(f"/proc/{pid}").exists() and not zombie(pid)])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", grpc_port)) != 0  # nobody listens any more


def zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
