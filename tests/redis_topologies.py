"""A real three-node Redis Cluster and a real Sentinel setup (a master, a replica, three sentinels)
on free loopback ports, for the tests of ``redis+cluster://`` and ``redis+sentinel://``.

The session fixtures in tests/conftest.py start each once, when a test first asks for it, and
stop it at the end. Tests may fail the Sentinel master over or restart a cluster node: they ask
where the master or a slot lives instead of remembering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

MASTER_NAME = "iam"
_NODE_TIMEOUT_MS = 2000  # cluster-node-timeout: a restarted node back within this keeps the cluster ok
_DOWN_AFTER_MS = 1000  # sentinel down-after-milliseconds


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/services.sh)", pytrace=False)
    return binary


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` free loopback ports; with ``bus``, ports whose cluster bus port (+10000) is free
    too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in ports or (bus and (port + 10000 > 65535 or not _bindable(port + 10000))):
            continue
        ports.append(port)
    return ports


def _wait(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds:.0f} s", pytrace=False)
        time.sleep(0.05)


def cli(port: int, *args: str, tls: tuple[str, ...] = ()) -> str:
    """One redis-cli command against 127.0.0.1:``port`` (``tls``: redis-cli's TLS options); its
    output ('' when it fails)."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *tls, *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.stdout if done.returncode == 0 else ""


def _info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.replace("\r", "").splitlines() if ":" in line)


@dataclass
class _Server:
    """One redis-server process (a node, the master or the replica, or a sentinel)."""

    port: int
    folder: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    tls: tuple[str, ...] = ()  # how redis-cli reaches it

    def start(self) -> None:
        log = (self.folder / f"{self.port}.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [_binary(), *self.args], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )
        _wait(
            lambda: cli(self.port, "ping", tls=self.tls).strip() == "PONG",
            f"redis on port {self.port} did not answer",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # nothing to save: every server runs without persistence
            self.process.wait(10)


def _data_args(port: int, folder: Path, *extra: str) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(folder), *extra,
    ]  # fmt: skip


@dataclass
class LocalCluster:
    """Three primaries, no replicas, every slot covered."""

    folder: Path
    nodes: dict[int, _Server] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Two of the three as seed nodes: the client learns the third from them."""
        ports = sorted(self.nodes)
        return f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"

    def start(self) -> None:
        for port in free_ports(3, bus=True):
            args = _data_args(
                port, self.folder,
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(_NODE_TIMEOUT_MS),
            )  # fmt: skip
            self.nodes[port] = _Server(port, self.folder, args)
            self.nodes[port].start()
        nodes = [f"127.0.0.1:{port}" for port in self.nodes]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-2000:]}", pytrace=False)
        self.wait_ok()

    def wait_ok(self) -> None:
        def ok() -> bool:
            return all(
                _info(cli(port, "cluster", "info")).get("cluster_state") == "ok" for port in self.nodes
            )

        _wait(ok, "the Redis Cluster did not reach cluster_state:ok")

    def port_of(self, tag: str) -> int:
        """The node serving the slot of hash tag ``tag`` (e.g. ``{deny}``)."""
        slot = key_slot(tag.encode())
        for port in self.nodes:
            for line in cli(port, "cluster", "nodes").splitlines():
                fields = line.split()
                if "myself" not in fields[2] or "master" not in fields[2]:
                    continue
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return port
        raise AssertionError(f"no node serves slot {slot}")

    def restart_empty(self, port: int) -> None:
        """Kill a node and start it again at once: it keeps its slots (nodes.conf) but no data."""
        node = self.nodes[port]
        node.stop()
        node.start()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


@dataclass
class LocalSentinel:
    """A master and its replica, watched by three sentinels (quorum 2)."""

    folder: Path
    servers: dict[int, _Server] = field(default_factory=dict)
    sentinels: dict[int, _Server] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> None:
        master, replica, *watchers = free_ports(5)
        sync_now = ("--repl-diskless-sync-delay", "0")  # a replica in sync at once, not after 5 s
        self.servers[master] = _Server(master, self.folder, _data_args(master, self.folder, *sync_now))
        self.servers[replica] = _Server(
            replica,
            self.folder,
            _data_args(replica, self.folder, *sync_now, "--replicaof", "127.0.0.1", str(master)),
        )
        for server in self.servers.values():
            server.start()
        for port in watchers:
            config = self.folder / f"sentinel-{port}.conf"  # sentinels rewrite their file
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            )
            self.sentinels[port] = _Server(port, self.folder, [str(config), "--sentinel"])
            self.sentinels[port].start()
        self.wait_settled(master)

    def master_seen_by(self, sentinel: int) -> int | None:
        answer = cli(sentinel, "sentinel", "get-master-addr-by-name", MASTER_NAME).split()
        return int(answer[1]) if len(answer) == 2 else None

    def wait_settled(self, master: int) -> None:
        """Every sentinel names ``master`` and knows the replica and the other sentinels, and the
        replica is in sync: a failover can be asked for."""

        def settled() -> bool:
            for sentinel in self.sentinels:
                state = cli(sentinel, "sentinel", "master", MASTER_NAME).split("\n")
                pairs = dict(zip(state[0::2], state[1::2], strict=False))
                if (
                    pairs.get("port") != str(master)
                    or pairs.get("flags") != "master"
                    or pairs.get("num-slaves") != "1"
                    or pairs.get("num-other-sentinels") != "2"
                ):
                    return False
                replicas = cli(sentinel, "sentinel", "replicas", MASTER_NAME)
                if "s_down" in replicas or "disconnected" in replicas:
                    return False
            replica = self.replica_port(master)
            return _info(cli(replica, "info", "replication")).get("master_link_status") == "up"

        _wait(settled, "the sentinels did not agree on the master and its replica", seconds=30)

    def replica_port(self, master: int) -> int:
        return next(port for port in self.servers if port != master)

    def master_port(self) -> int:
        seen = {self.master_seen_by(port) for port in self.sentinels}
        if len(seen) != 1 or None in seen:
            raise AssertionError(f"the sentinels disagree on the master: {seen}")
        return next(iter(seen))  # type: ignore[arg-type]

    async def kill_master(self) -> int:
        """SIGKILL the master; returns once every sentinel names the promoted replica (after
        ``down-after-milliseconds`` and an election: about 2 s)."""
        old = self.master_port()
        self.servers[old].stop()
        return await self._wait_for_master(self.replica_port(old))

    async def _wait_for_master(self, new: int) -> int:
        deadline = time.monotonic() + 20
        while True:
            seen = await asyncio.to_thread(lambda: {self.master_seen_by(port) for port in self.sentinels})
            if seen == {new}:
                return new
            if time.monotonic() > deadline:
                raise AssertionError(f"the failover did not complete: the sentinels name {seen}")
            await asyncio.sleep(0.05)

    async def failover(self) -> int:
        """SENTINEL FAILOVER, without blocking the event loop (a service may run on it); returns
        once every sentinel names the new master. The old master is left as it is: the sentinels
        turn it into a replica some seconds later (:meth:`wait_settled` waits for that)."""
        old = self.master_port()
        sentinel = aioredis.Redis(host="127.0.0.1", port=next(iter(self.sentinels)))
        try:
            await sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        finally:
            await sentinel.aclose()
        return await self._wait_for_master(self.replica_port(old))

    def settle(self) -> None:
        """After a failover: make the old master a replica of the new one now (the sentinels
        would, about ten seconds later) and wait until another failover can be asked for."""
        master = self.master_port()
        old = self.servers[self.replica_port(master)]
        if old.process is None or old.process.poll() is not None:  # killed: back as a replica
            at = old.args.index("--replicaof") if "--replicaof" in old.args else len(old.args)
            old.args = [*old.args[:at], *old.args[at + 3 :], "--replicaof", "127.0.0.1", str(master)]
            old.start()
        else:
            cli(old.port, "replicaof", "127.0.0.1", str(master))
        self.wait_settled(master)

    def stop(self) -> None:
        for server in [*self.sentinels.values(), *self.servers.values()]:
            with contextlib.suppress(Exception):
                server.stop()


@dataclass
class TlsRedis:
    """Over TLS only (certificates for 127.0.0.1 from ``ca``, a trustme.CA): a one-node Redis
    Cluster, and a master watched by one sentinel. Small, since what is checked is the TLS path."""

    folder: Path
    ca: Any
    servers: list[_Server] = field(default_factory=list)
    cluster_port: int = 0
    sentinel_port: int = 0
    master_port: int = 0

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    def start(self) -> None:
        cert = self.ca.issue_cert("127.0.0.1")
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(self.folder / "cert.pem"))
        cert.private_key_pem.write_to_path(str(self.folder / "key.pem"))
        files = (
            f"tls-cert-file {self.folder}/cert.pem\ntls-key-file {self.folder}/key.pem\n"
            f"tls-ca-cert-file {self.ca_file}\ntls-auth-clients no\n"
        )
        tls = ("--tls", "--cacert", str(self.ca_file))
        self.cluster_port, self.master_port, self.sentinel_port = free_ports(3, bus=True)
        for port, extra in (
            (self.cluster_port, "cluster-enabled yes\ntls-cluster yes\ncluster-config-file nodes-tls.conf\n"),
            (self.master_port, ""),
        ):
            config = self.folder / f"redis-{port}.conf"
            config.write_text(
                f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
                f"dir {self.folder}\n{files}{extra}"
            )
            self.servers.append(_Server(port, self.folder, [str(config)], tls=tls))
            self.servers[-1].start()
        cli(self.cluster_port, "cluster", "addslotsrange", "0", "16383", tls=tls)
        _wait(
            lambda: _info(cli(self.cluster_port, "cluster", "info", tls=tls)).get("cluster_state") == "ok",
            "the TLS cluster node did not reach cluster_state:ok",
        )
        config = self.folder / f"sentinel-{self.sentinel_port}.conf"
        config.write_text(
            f"port 0\ntls-port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.folder}\n{files}"
            f"tls-replication yes\nsentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
        )
        self.servers.append(_Server(self.sentinel_port, self.folder, [str(config), "--sentinel"], tls=tls))
        self.servers[-1].start()
        _wait(
            lambda: (
                cli(self.sentinel_port, "sentinel", "get-master-addr-by-name", MASTER_NAME, tls=tls).split()
                == ["127.0.0.1", str(self.master_port)]
            ),
            "the TLS sentinel did not name the master",
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
