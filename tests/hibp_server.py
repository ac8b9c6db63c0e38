"""A real HTTP/1.1 Have I Been Pwned range server on 127.0.0.1 for tests.

The standard library's ``http.server`` in a thread: a parser independent of
the h11 client under test. It serves ``/range/<PREFIX>`` from an in-memory
map of SHA-1 hashes to counts, always mixes in zero-count padding lines, and
records every request's path and headers so tests can check what left the
client. ``mode`` switches the answer: ``normal``, ``slow`` (waits past the
client's timeout), ``status`` (answers ``status_code``), ``malformed`` (a 200
whose body is not a range), ``huge`` (a 200 body over 1 MiB) and ``closed``
(hangs up without answering). Given a server-side ``ssl.SSLContext`` it
speaks HTTPS.
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
import threading
import unicodedata
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("normal", "slow", "status", "malformed", "huge", "closed")


def sha1_hex(password: str) -> str:
    """The key the range API uses for a password: uppercase SHA-1 of its NFKC UTF-8 form."""
    data = unicodedata.normalize("NFKC", password).encode("utf-8")
    return hashlib.sha1(data, usedforsecurity=False).hexdigest().upper()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it; header names lowercased."""

    path: str
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: nothing outlives stop()
    owner: RangeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or gave up mid-body is the point of several tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        if self.server.owner.mode == "closed":
            return  # the socket is closed without a byte of answer
        super().handle()

    def do_GET(self) -> None:
        owner = self.server.owner
        owner._record(RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}))
        mode = owner.mode
        if mode == "slow":
            owner._stopping.wait(owner.slow_seconds)
        if mode == "status":
            self._send(owner.status_code, b"unavailable\r\n", extra={"Location": "/elsewhere"})
            return
        if mode == "malformed":
            self._send(200, b"<html>this is not a range</html>\r\n")
            return
        if mode == "huge":
            line = ("0" * 35 + ":0\r\n").encode()
            self._send(200, line * (2 * 1024 * 1024 // len(line)))
            return
        prefix = self.path.removeprefix("/range/")
        if len(prefix) != 5 or any(c not in "0123456789ABCDEF" for c in prefix):
            self._send(400, b"The hash prefix was not in a valid format\r\n")
            return
        self._send(200, owner._range(prefix))

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        chunked = self.server.owner.chunked and status == 200
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if chunked:
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)
        self.close_connection = True


class RangeServer:
    """Start with :meth:`start`, stop with :meth:`stop`; :meth:`reset` between tests."""

    def __init__(self, padding: int = 25, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.hashes: dict[str, int] = {}
        self.padding = padding
        self.mode = "normal"
        self.status_code = 503
        self.slow_seconds = 5.0
        self.newline = "\r\n"
        self.chunked = False
        self.extra_padding: list[str] = []  # suffixes served with count 0 on top of the random padding
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add(self, password: str, count: int) -> str:
        """Make ``password`` breached ``count`` times; returns its hash."""
        digest = sha1_hex(password)
        self.hashes[digest] = count
        return digest

    def reset(self) -> None:
        self.hashes.clear()
        self.mode = "normal"
        self.status_code = 503
        self.newline = "\r\n"
        self.chunked = False
        self.extra_padding = []
        with self._lock:
            self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/range/"

    def start(self) -> None:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        if self.tls is not None:
            # Handshakes happen on accept, in the serving thread; a failed one only drops that client.
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hibp-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # wake handlers waiting in slow mode
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _range(self, prefix: str) -> bytes:
        lines = [
            f"{digest[5:]}:{count}" for digest, count in self.hashes.items() if digest.startswith(prefix)
        ]
        lines += [f"{secrets.token_hex(18)[:35].upper()}:0" for _ in range(self.padding)]
        lines += [f"{suffix}:0" for suffix in self.extra_padding]
        # Ordered by suffix like the real API; the sort is stable, so a padding line that repeats a real
        # suffix comes after it, where a client that let the last line win would lose the real count.
        lines.sort(key=lambda line: line[:35])
        return (self.newline.join(lines) + self.newline).encode("ascii")
