"""The small ops HTTP listener: ``/healthz``, ``/metrics`` and (with the token
system) ``/.well-known/jwks.json``. GET and HEAD only, small bounded requests,
HTTP/1.1 parsing by h11."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Self

import h11

from iam_grpc.logging import component_logger

__all__ = ["OpsHttpServer", "Response", "Route"]

log = component_logger("iam.http")

_MAX_REQUEST_BYTES = 16 * 1024
_IDLE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Route = Callable[[], Awaitable[Response]]


class OpsHttpServer:
    def __init__(self, routes: dict[str, Route], host: str, port: int) -> None:
        self._routes = routes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port, reuse_address=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, h11.ProtocolError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(_IDLE_TIMEOUT):
                    data = await reader.read(4096)
                conn.receive_data(data)
                if not data and conn.their_state is h11.DONE:
                    return
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                continue
            response = await self._respond(event)
            head = event.method == b"HEAD"
            headers = [
                ("content-type", response.content_type),
                ("content-length", str(len(response.body))),
                *response.headers,
            ]
            if not any(name.lower() == "cache-control" for name, _ in response.headers):
                headers.append(("cache-control", "no-store"))
            writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=b"" if head else response.body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            # drain the request body, if any, then allow keep-alive
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(_IDLE_TIMEOUT):
                        data = await reader.read(4096)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _respond(self, request: h11.Request) -> Response:
        if request.method not in (b"GET", b"HEAD"):
            return Response(405, b'{"error":"method not allowed"}', headers=(("allow", "GET, HEAD"),))
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        route = self._routes.get(path)
        if route is None:
            return Response(404, b'{"error":"not found"}')
        try:
            return await route()
        except Exception:
            log.exception("ops endpoint failed")
            return Response(500, b'{"error":"internal"}')
