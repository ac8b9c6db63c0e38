"""One HTTP POST over a fresh connection (h11 over asyncio streams, TLS for https): the webhook
sender's transport, with no client library of its own."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

__all__ = ["Endpoint", "PostFailed", "post"]

_READ_CHUNK = 16384
_MAX_BODY = 64 * 1024  # a receiver's answer is read and dropped; bounded


class PostFailed(Exception):
    """The request did not get an answer (``status`` None) or got a non-2xx one."""

    def __init__(self, summary: str, status: int | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.status = status


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    target: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = port == (443 if tls else 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        return cls(parts.hostname, port, tls, target, host if default else f"{host}:{port}")


async def post(
    endpoint: Endpoint,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    context: ssl.SSLContext | None = None,
) -> int:
    """POST ``body``; the status of a 2xx answer, else :class:`PostFailed`. The caller bounds the
    time (``asyncio.timeout``)."""
    try:
        reader, writer = await asyncio.open_connection(
            endpoint.host,
            endpoint.port,
            ssl=(context or ssl.create_default_context()) if endpoint.tls else None,
            server_hostname=endpoint.host if endpoint.tls else None,
        )
    except OSError as exc:
        raise PostFailed(f"connect: {type(exc).__name__}") from exc
    try:
        return await _exchange(reader, writer, endpoint, headers, body)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    endpoint: Endpoint,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> int:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=endpoint.target,
        headers=[
            ("Host", endpoint.host_header),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *headers,
        ],
    )
    status: int | None = None
    received = 0
    try:
        writer.write(conn.send(request) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_CHUNK))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > _MAX_BODY:
                    break
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    except (h11.ProtocolError, OSError) as exc:
        if status is None:
            raise PostFailed(f"exchange: {type(exc).__name__}") from exc
    if status is None:
        raise PostFailed("no answer")
    if not 200 <= status < 300:
        raise PostFailed(f"status {status}", status)
    return status
