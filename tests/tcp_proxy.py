"""A TCP proxy of the tests' own in front of a shared server (MariaDB), so a test can make the
server go away or stall without touching the server other work uses.

It runs on an event loop in its own thread, so it keeps forwarding at its pace whatever the test's
loop is busy with, and sync and async tests drive it alike:

- ``cut()``: every connection is dropped and new ones are closed at once, as a server that went
  away (clients see a lost connection / refused handshake);
- ``stall()``: connections stay open and new ones are accepted, but no byte moves in either
  direction, as a server that hangs (SIGSTOP, a saturated disk, a dead switch);
- ``restore()``: back to normal; bytes held during a stall are delivered.

``accepted`` counts client connections, so a test can tell whether a pool opens and drops
connections against a failing server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

__all__ = ["TcpProxy", "tcp_proxy"]


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()  # set while not stalled (used on the proxy's loop only)
        self._down = False
        self.accepted = 0
        self.port = 0

    # control (from any thread) ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def cut(self) -> None:
        self._call(self._cut)

    def stall(self) -> None:
        self._call(self._flowing.clear)

    def restore(self) -> None:
        def back() -> None:
            self._down = False
            self._flowing.set()

        self._call(back)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, action: object) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                action()  # type: ignore[operator]
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    # the proxy's loop ---------------------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _cut(self) -> None:
        self._down = True
        self._flowing.set()  # a cut ends a stall: nothing waits on it any more
        for writer in list(self._writers):
            writer.transport.abort()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        self._cut()
        await self._server.wait_closed()
        await asyncio.sleep(0.05)  # let the aborted connections' handlers finish

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            if self._down:
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()  # a stall holds what was read until restore()
                if self._down:
                    return
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()


@contextlib.contextmanager
def tcp_proxy(host: str, port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
