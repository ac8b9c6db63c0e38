"""A real DNS server on loopback for tests: UDP and TCP on one free port, served
from a thread with dnspython's message API, so the resolver under test speaks the
real protocol over real sockets.

The zone maps a name to its records by type (``{"MX": ["10 mx.a.test."]}``), or
to a misbehaviour for the whole name. A record type may also map to a
misbehaviour, so one family can fail while another answers:

- ``SERVFAIL``: answer with rcode SERVFAIL.
- ``SILENT``: read the query and never answer (the client times out).

Names not in the zone get NXDOMAIN; a name in the zone without records of the
asked type gets NOERROR with an empty answer. Names in ``tcp_only`` get a
truncated UDP answer (TC bit, no records), so the client must ask again over TCP. ``mode`` switches the whole server
to one misbehaviour (``SERVFAIL`` or ``SILENT``), as when a resolver is down.
Every query received is recorded in ``queries``.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

SERVFAIL = "servfail"
SILENT = "silent"

Records = Mapping[str, Sequence[str] | str]
Zone = Mapping[str, Records | str]


@dataclass(frozen=True, slots=True)
class Query:
    name: str  # lower case, no final dot
    rdtype: str  # "MX", "A", ...
    transport: str  # "udp" or "tcp"


class DnsServer:
    def __init__(self, zone: Zone, *, host: str = "127.0.0.1", tcp_only: Sequence[str] = ()) -> None:
        self.zone = {name.rstrip(".").lower(): entry for name, entry in zone.items()}
        self.tcp_only = frozenset(name.rstrip(".").lower() for name in tcp_only)
        self.host = host
        self.port = 0
        self.mode: str | None = None
        self._queries: list[Query] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    @property
    def nameserver(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6), as ``email_checks.nameservers`` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def queries_for(self, name: str) -> list[Query]:
        return [query for query in self.queries if query.name == name]

    def start(self) -> None:
        self._udp, self._tcp = _bind_pair(self.host)
        self.port = self._udp.getsockname()[1]
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(self._udp, self._tcp), name="test-dns-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, udp: socket.socket, tcp: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ, "udp")
            selector.register(tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.data == "udp":
                        self._serve_udp(udp)
                    else:
                        self._serve_tcp(tcp)

    def _serve_udp(self, sock: socket.socket) -> None:
        try:
            wire, peer = sock.recvfrom(65535)
        except OSError:
            return
        reply = self._reply(wire, "udp")
        if reply is not None:
            sock.sendto(reply, peer)

    def _serve_tcp(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            try:
                (length,) = struct.unpack("!H", _read_exactly(conn, 2))
                reply = self._reply(_read_exactly(conn, length), "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except (OSError, EOFError):
                return

    def _reply(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append(Query(name, rdtype, transport))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        entry = self.zone.get(name)
        behaviour = self.mode or (entry if isinstance(entry, str) else None)
        records = entry.get(rdtype, ()) if isinstance(entry, Mapping) else ()
        if behaviour is None and isinstance(records, str):
            behaviour, records = records, ()
        if behaviour == SILENT:
            return None
        if behaviour == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name in self.tcp_only and transport == "udp":
            response.flags |= dns.flags.TC
        elif entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif records:
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", rdtype, *records))
        return response.to_wire()


def _bind_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port (a resolver uses one port for both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP")


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError("peer closed the connection")
        data += chunk
    return data
